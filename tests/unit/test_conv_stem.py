"""The optional convolutional branch of the patch embedding (``vision.conv_stem``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from coca_edge.models import CoCa, CoCaConfig, get_preset
from coca_edge.models.config import ConfigError
from coca_edge.models.inherit import InheritError, inherit_weights


def _with_stem(config: CoCaConfig, channels: int) -> CoCaConfig:
    return config.replace(vision=dataclasses.replace(config.vision, conv_stem=channels))


@pytest.mark.parametrize("value, match", [(-4, "multiple of 4"), (6, "multiple of 4"), (True, "multiple of 4"),
                                          ("8", "multiple of 4")])
def test_bad_conv_stem_is_a_config_error(value, match):
    with pytest.raises(ConfigError, match=match):
        _with_stem(get_preset("test-tiny"), value)


def test_conv_stem_needs_patch_divisible_by_4():
    config = get_preset("test-tiny")
    with pytest.raises(ConfigError, match="patch_size divisible by 4"):
        config.replace(vision=dataclasses.replace(config.vision, patch_size=2, image_size=32, conv_stem=8))


def test_config_round_trip_and_unchanged_without_stem():
    plain = get_preset("test-tiny")
    assert "conv_stem" not in plain.to_dict()["vision"]  # configs (and their hashes) without a stem read as before
    stem = _with_stem(plain, 16)
    assert stem.to_dict()["vision"]["conv_stem"] == 16
    assert CoCaConfig.from_dict(stem.to_dict()) == stem


def test_stem_starts_as_a_no_op_and_then_changes_the_image_path(tiny_model, tiny_pixels):
    """Inheriting into a student with a stem gives the stem-less student's function exactly;
    once the stem's output convolution is non-zero, the image embedding moves."""
    config = tiny_model.config
    plain = inherit_weights(tiny_model, config).eval()
    stem = inherit_weights(tiny_model, _with_stem(config, 16)).eval()
    assert torch.count_nonzero(stem.visual.stem.out.weight) == 0
    assert stem.visual.stem.conv1.out_channels == 4 and stem.visual.stem.conv2.out_channels == 16
    with torch.no_grad():
        a, b = plain.encode_image(tiny_pixels), stem.encode_image(tiny_pixels)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        stem.visual.stem.out.weight.normal_(0, 0.1)
        c = stem.encode_image(tiny_pixels)
    assert (c[0] - a[0]).abs().max() > 1e-3
    loss = stem.encode_image(tiny_pixels)[0].sum()
    loss.backward()
    assert stem.visual.stem.conv1.weight.grad.abs().sum() > 0


def test_inherit_between_stems(tiny_model):
    teacher = inherit_weights(tiny_model, _with_stem(tiny_model.config, 16))
    with torch.no_grad():
        teacher.visual.stem.out.weight.normal_(0, 0.1)
    same = inherit_weights(teacher, teacher.config)
    for name, value in teacher.state_dict().items():
        assert torch.equal(same.state_dict()[name], value), name
    with pytest.raises(InheritError, match="vision.conv_stem"):
        inherit_weights(teacher, _with_stem(tiny_model.config, 8))


def test_stem_model_exports_and_captions_like_pytorch(tmp_path, tiny_pixels):
    from coca_edge.exporters.bundle import export_bundle
    from coca_edge.models.generate import greedy_generate
    from coca_edge.runtime import EdgeCoCa

    torch.manual_seed(0)
    model = CoCa(_with_stem(get_preset("test-tiny"), 8)).eval()
    with torch.no_grad():
        model.visual.stem.out.weight.normal_(0, 0.2)
    export_bundle(model, tmp_path / "b", progress=False)  # validates every graph against PyTorch
    runtime = EdgeCoCa.load(tmp_path / "b")
    pixels = tiny_pixels.numpy().astype(np.float32)
    ref = greedy_generate(model, tiny_pixels, max_new_tokens=8)
    out = runtime.caption_ids(pixels, max_new_tokens=8)
    for i, seq in enumerate(out.sequences):
        assert ref[i, 1:1 + len(seq)].tolist() == seq
