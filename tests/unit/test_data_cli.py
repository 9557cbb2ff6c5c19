"""``coca-edge data`` commands, through ``register`` as the main CLI uses them."""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from tests.unit.conftest_data import write_csv, write_image
from coca_edge.data.cli import main, register


def test_register_adds_data_command():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "preview", "--n", "2", "--out", "x.png"])
    assert callable(args.func) and args.n == 2
    assert parser.parse_args(["data"]).func(None) == 2  # no subcommand: help, error code


def test_preview_synthetic(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    assert main(["data", "preview", "--dataset", "synthetic-scenes", "--split", "val", "--n", "6",
                 "--cols", "3", "--cell", "96", "--out", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.size[0] == 3 * (96 + 12) and sheet.size[1] > 2 * 96
    assert np.asarray(sheet).std() > 10  # not blank
    assert "6 samples" in capsys.readouterr().out


def test_preview_csv_reports_skips_and_errors(tmp_path, capsys):
    write_image(tmp_path / "a.png")
    csv = write_csv(tmp_path / "d.csv", [("a.png", "one"), ("gone.png", "two")], header=("img", "cap"), sep=",")
    out = tmp_path / "p.png"
    assert main(["data", "preview", "--csv", str(csv), "--csv-img-key", "img", "--csv-caption-key", "cap",
                 "--csv-separator", ",", "--out", str(out)]) == 0
    assert "missing: 1" in capsys.readouterr().out
    assert main(["data", "preview", "--csv", str(csv), "--out", str(out)]) == 2
    assert "no column 'filepath'" in capsys.readouterr().err


def test_generate_and_tasks(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path), "--split", "val", "--n", "5", "--format", "wds",
                 "--shard-size", "3", "--image-size", "32"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["val-00000.tar", "val-00001.tar"]
    assert main(["data", "preview", "--wds", str(tmp_path / "val-{00000..00001}.tar"), "--n", "4",
                 "--out", str(tmp_path / "w.png")]) == 0
    assert main(["data", "tasks", "--split", "val", "--n", "20"]) == 0
    listing = capsys.readouterr().out
    assert "relation" in listing and "chance=0.250" in listing
