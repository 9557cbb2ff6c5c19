"""Freezing the visual tower really freezes it, and unfreezing resumes its training."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from coca_edge.distill.config import TrainConfig
from coca_edge.distill.trainer import train
from coca_edge.models import CoCa, get_preset


def _run(tmp_path, steps):
    cfg = TrainConfig.from_dict({
        "model": "test-tiny", "output_dir": str(tmp_path / f"s{steps}"), "steps": steps, "batch_size": 8,
        "freeze_visual_epochs": 0.5, "threads": 1, "data": {"train_size": 32, "max_text_len": 16},
        "loss": {"caption_vocab": "data"}, "optim": {"warmup_steps": 0, "lr": 1e-3}, "eval": {"at_end": False}})
    train(cfg, progress=False)
    return load_file(str(tmp_path / f"s{steps}" / "final" / "model.safetensors"))


def test_visual_frozen_for_first_epochs_then_trained(tmp_path):
    torch.manual_seed(0)
    init = CoCa(get_preset("test-tiny")).state_dict()
    frozen = _run(tmp_path, 2)  # 0.5 epoch of 32 samples at batch 8 = 2 frozen steps
    visual = [k for k in init if k.startswith("visual.")]
    assert all(torch.equal(frozen[k], init[k]) for k in visual)
    assert not torch.equal(frozen["text.proj"], init["text.proj"])
    assert not torch.equal(frozen["decoder.cross.0.q.weight"], init["decoder.cross.0.q.weight"])
    later = _run(tmp_path, 3)
    assert not torch.equal(later["visual.proj"], init["visual.proj"])
    assert not torch.equal(later["visual.blocks.0.attn.qkv.weight"], init["visual.blocks.0.attn.qkv.weight"])
