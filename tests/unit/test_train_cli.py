"""``train`` / ``distill`` subcommands: parsing and clear errors for bad teachers."""
from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file

from coca_edge.models import CoCa, CoCaConfig, get_preset
from coca_edge.distill.cli import main, register


def _save(model, directory):
    directory.mkdir()
    save_file(model.state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(model.config.to_json())
    return directory / "model.safetensors"


def test_register_adds_both_subcommands():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", "--teacher", "t.safetensors", "--student", "test-tiny", "--resume"])
    assert args.mode == "distill" and args.teacher == "t.safetensors" and args.resume == "latest" and callable(args.func)
    assert parser.parse_args(["train", "r.yaml", "--set", "steps=3"]).overrides == ["steps=3"]


def _bad_vocab_teacher(tmp_path):
    d = get_preset("test-tiny").to_dict()
    d["text"]["vocab_size"] = 49500
    torch.manual_seed(0)
    return _save(CoCa(CoCaConfig.from_dict(d)), tmp_path / "teacher")


def test_teacher_with_other_vocabulary_is_a_clear_error(tmp_path, capsys):
    teacher = _bad_vocab_teacher(tmp_path)
    code = main(["distill", "--teacher", str(teacher), "--student", "test-tiny", "--output-dir", str(tmp_path / "o"),
                 "--set", "loss.caption_kd=1", "--no-progress"])
    assert code == 2
    assert "vocabulary sizes differ (teacher 49500, student 49408)" in capsys.readouterr().err


def test_corrupt_teacher_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "t.safetensors").write_bytes(b"not a checkpoint")
    code = main(["distill", "--teacher", str(tmp_path / "t.safetensors"), "--student", "test-tiny",
                 "--set", "loss.feature=1", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "t.safetensors" in capsys.readouterr().err


def test_wider_teacher_distills_through_a_projection(tmp_path, capsys):
    d = get_preset("test-tiny").to_dict()
    d["embed_dim"] = d["text"]["width"] = d["decoder"]["width"] = 96
    torch.manual_seed(0)
    teacher = _save(CoCa(CoCaConfig.from_dict(d)), tmp_path / "teacher")
    code = main(["distill", "--teacher", str(teacher), "--student", "test-tiny", "--output-dir", str(tmp_path / "o"),
                 "--steps", "2", "--no-progress", "--set", "batch_size=4", "--set", "threads=1",
                 "--set", "data.train_size=8", "--set", "eval.at_end=false", "--set", "loss.caption_vocab=data",
                 "--set", "loss.feature=1", "--set", "loss.affinity=1", "--set", "loss.caption_kd=1"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "checkpoints" / "step-00000002" / "extra.safetensors").is_file()
