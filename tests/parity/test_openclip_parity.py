"""coca-edge CoCa vs open_clip CoCa with the same weights, loaded through an open_clip checkpoint file."""
from __future__ import annotations

import pytest
import torch

from coca_edge.models import get_preset
from coca_edge.models.generate import greedy_generate
from coca_edge.models.openclip import load_checkpoint, save_open_clip

from .openclip_helpers import make_open_clip_coca

open_clip = pytest.importorskip("open_clip")

# FP32, same weights, different kernels (SDPA vs nn.MultiheadAttention): observed max-abs
# differences are ~3e-6 on caption logits for coca_ViT-B-32; the bar is 1e-5.
ATOL = 1e-5

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow with a red ball", "", "A STOP sign!!"]


def _check(preset: str, tmp_path, suffix: str, batch: int, gen_tokens: int):
    config = get_preset(preset)
    oc = make_open_clip_coca(config)
    path = tmp_path / f"oc{suffix}"
    if suffix == ".bin":
        torch.save(oc.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    model = load_checkpoint(path, preset=preset)

    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))
    ids = open_clip.get_tokenizer("coca_ViT-B-32")(CAPTIONS[:batch])
    with torch.no_grad():
        ref = oc(pixels, ids)
        out = model(pixels, ids)
        ref_tokens = oc._encode_image(pixels)[1]
        tokens = model.encode_image(pixels)[1]
    for key in ("image_features", "text_features", "logits"):
        err = (ref[key] - out[key]).abs().max().item()
        assert err < ATOL, f"{preset} {key}: max-abs {err:.2e} >= {ATOL}"
    assert (ref_tokens - tokens).abs().max().item() < ATOL

    # open_clip forbids the end token while the sequence (start token included) is shorter
    # than min_seq_len=5 and forces it at seq_len; compare every token before that.
    ref_ids = oc.generate(pixels, generation_type="top_k", top_k=1, seq_len=gen_tokens + 2)
    ours = greedy_generate(model, pixels, max_new_tokens=gen_tokens, min_new_tokens=4)
    assert ours.shape[1] == gen_tokens + 1
    assert torch.equal(ours, ref_ids[:, : gen_tokens + 1])
    return model, oc


def test_tiny_parity_and_greedy(tmp_path):
    _check("test-tiny", tmp_path, ".bin", batch=4, gen_tokens=30)


@pytest.mark.slow
def test_vit_b32_parity_and_greedy(tmp_path):
    _check("coca_ViT-B-32", tmp_path, ".safetensors", batch=2, gen_tokens=22)


def test_round_trip_is_lossless(tmp_path):
    config = get_preset("test-tiny")
    oc = make_open_clip_coca(config)
    torch.save(oc.state_dict(), tmp_path / "in.bin")
    model = load_checkpoint(tmp_path / "in.bin", preset="test-tiny")
    for target in ("out.safetensors", "out.bin", "snapshot"):
        save_open_clip(model, tmp_path / target)
        again = load_checkpoint(tmp_path / target, preset=None if target == "snapshot" else "test-tiny")
        for key, value in model.state_dict().items():
            assert torch.equal(value, again.state_dict()[key]), (target, key)
    from safetensors.torch import load_file
    written = load_file(str(tmp_path / "out.safetensors"))
    original = oc.state_dict()
    assert set(written) == set(original)
    for key, value in original.items():
        assert torch.equal(value, written[key]), key


def test_hub_snapshot_loads_into_open_clip(tmp_path):
    """A snapshot directory written by coca-edge is read by open_clip itself."""
    config = get_preset("test-tiny")
    oc = make_open_clip_coca(config)
    torch.save(oc.state_dict(), tmp_path / "w.bin")
    save_open_clip(load_checkpoint(tmp_path / "w.bin", preset="test-tiny"), tmp_path / "snap")
    import json
    from safetensors.torch import load_file
    cfg = json.loads((tmp_path / "snap" / "open_clip_config.json").read_text())["model_cfg"]
    cfg.pop("custom_text")
    fresh = open_clip.CoCa(**cfg)
    fresh.load_state_dict(load_file(str(tmp_path / "snap" / "open_clip_model.safetensors")))
    for key, value in oc.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_open_clip_training_checkpoint(tmp_path):
    """open_clip's train.py saves {'epoch', 'name', 'state_dict', 'optimizer'} with DDP 'module.' prefixes."""
    config = get_preset("test-tiny")
    oc = make_open_clip_coca(config)
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    model = load_checkpoint(tmp_path / "epoch_3.pt", preset="test-tiny")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.encode_image(pixels)[0] - oc.encode_image(pixels)).abs().max() < ATOL
