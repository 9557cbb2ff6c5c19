"""``tensorboard: true`` writes the JSONL metrics as TensorBoard scalars; without the package
it is a clear error before any work starts."""
from __future__ import annotations

import importlib.util
import json

import pytest

from coca_edge.distill.config import TrainConfig, TrainConfigError
from coca_edge.distill.trainer import train


def _cfg(tmp_path, **extra):
    return TrainConfig.from_dict({"model": "test-tiny", "output_dir": str(tmp_path / "run"), "steps": 3,
                                  "batch_size": 4, "threads": 1, "log_every": 1, "tensorboard": True,
                                  "data": {"train_size": 8, "max_text_len": 12},
                                  "eval": {"at_end": True, "n": 12, "captions": 2}, **extra})


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is in the test extra")
def test_metrics_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tmp_path), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/contrastive", "train/caption", "train/lr", "eval/zero_shot_top1"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [round(r["loss"], 5) for r in rows if "loss" in r]


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrainConfigError, match=r"coca-edge\[tensorboard\]"):
        train(_cfg(tmp_path), progress=False)
    assert not (tmp_path / "run").exists()  # nothing started
