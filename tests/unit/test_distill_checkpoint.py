"""Checkpoints: atomic writes, verification on load, keep-last-N, disk full."""
from __future__ import annotations

import errno

import pytest
import torch

from coca_edge.distill import checkpoint as ckpt


def _save(root, step, value=1.0, keep=3):
    state = {"w": torch.full((4,), value)}
    return ckpt.save_checkpoint(root, step, state, '{"name": "x"}', {}, {"optimizer": {}, "torch_rng": torch.get_rng_state()},
                                {"note": "test"}, keep)


def test_save_load_latest_and_prune(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, float(step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    path = ckpt.resolve_resume(tmp_path, "latest")
    loaded = ckpt.load_checkpoint_dir(path)
    assert loaded.meta["step"] == 4 and torch.equal(loaded.model["w"], torch.full((4,), 4.0))
    assert ckpt.resolve_resume(tmp_path / "empty", "latest") is None


def test_corrupted_checkpoint_is_a_clear_error_and_previous_survives(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"model.safetensors does not match.*step-00000001 is still there"):
        ckpt.load_checkpoint_dir(ckpt.resolve_resume(tmp_path, "latest"))
    assert ckpt.load_checkpoint_dir(tmp_path / "step-00000001").meta["step"] == 1
    (bad / "meta.json").write_text("{trunc")
    with pytest.raises(ckpt.CheckpointCorruptError, match="cannot read meta.json"):
        ckpt.load_checkpoint_dir(bad)


def test_disk_full_leaves_latest_on_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointSaveError, match="No space left"):
        _save(tmp_path, 2)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert ckpt.load_checkpoint_dir(ckpt.resolve_resume(tmp_path, "latest")).meta["step"] == 1
