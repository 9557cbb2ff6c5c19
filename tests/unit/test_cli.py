from __future__ import annotations

import json
import subprocess
import sys

from coca_edge.cli import main


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("coca_ViT-B-32"))
    assert "89.16M" in line and "63.43M" in line and "100.97M" in line and "253.56M" in line
    for name in ("coca_ViT-L-14", "coca_ViT-S-32", "coca_ViT-Ti-32", "coca_ViT-Mi-32", "test-tiny"):
        assert name in out


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["coca_ViT-L-14"]["total"] == 638_450_177


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "coca_edge.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "models" in result.stdout


def test_every_command_help_has_an_example():
    from coca_edge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [name for name, p in sub.choices.items() if "example" not in p.format_help().lower()]
    assert len(sub.choices) >= 11 and not missing, missing


def test_progress_bars_redraw_rarely_into_a_log(monkeypatch):
    import io

    import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    from coca_edge import cli

    # as shipped (tqdm's own __init__ is a partialmethod too: the bug this caught), undoing
    # what an earlier main() in this process did; monkeypatch restores it after the test
    shipped = vars(tqdm.tqdm).get("_coca_edge_unquiet") or vars(tqdm.tqdm)["__init__"]
    monkeypatch.setattr(tqdm.tqdm, "__init__", shipped)
    monkeypatch.setattr(tqdm.tqdm, "_coca_edge_unquiet", None, raising=False)
    monkeypatch.setenv("TQDM_MININTERVAL", "2")           # a value the user set: left alone
    cli._quiet_progress_when_logged()
    assert tqdm.tqdm(total=1, file=io.StringIO()).mininterval != 30.0
    monkeypatch.delenv("TQDM_MININTERVAL")
    monkeypatch.setattr(sys, "stderr", io.StringIO())     # not a terminal, like a log file
    cli._quiet_progress_when_logged()
    cli._quiet_progress_when_logged()                     # idempotent
    assert tqdm.tqdm(total=1, file=io.StringIO()).mininterval == 30.0
    assert auto_tqdm(total=1, file=io.StringIO()).mininterval == 30.0
    assert tqdm.tqdm(total=1, file=io.StringIO(), mininterval=1).mininterval == 1
