"""Training configuration: validation, YAML, overrides."""
from __future__ import annotations

import pytest

from coca_edge.distill.config import TrainConfig, TrainConfigError, load_config


def test_defaults_roundtrip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.loss.contrastive == 1.0 and cfg.loss.caption == 2.0 and cfg.optim.lr == 1e-4


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(TrainConfigError, match=r"unknown key\(s\) \['stpes'\]"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(TrainConfigError, match=r"config.loss: unknown key\(s\) \['affinty'\]"):
        TrainConfig.from_dict({"loss": {"affinty": 1.0}})


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: test-tiny\noptim:\n  lr: 3e-4\nloss:\n  caption: 1.5\n")
    cfg = load_config(path, ["steps=7", "loss.feature=0.5", "teacher.path=t.safetensors"])
    assert cfg.optim.lr == 3e-4 and cfg.steps == 7 and cfg.loss.feature == 0.5 and cfg.loss.caption == 1.5


def test_validation_messages():
    with pytest.raises(TrainConfigError, match="a teacher is needed"):
        TrainConfig.from_dict({"loss": {"caption_kd": 1.0}})
    with pytest.raises(TrainConfigError, match="divisible by grad_accum"):
        TrainConfig.from_dict({"batch_size": 10, "grad_accum": 3})
    with pytest.raises(TrainConfigError, match="at least one loss weight"):
        TrainConfig.from_dict({"loss": {"contrastive": 0, "caption": 0}})
