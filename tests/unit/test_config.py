from __future__ import annotations

import json

import pytest
import torch

from coca_edge.models import CoCa, CoCaConfig, ConfigError, get_preset, list_presets


def test_presets_round_trip():
    names = list_presets()
    for required in ("coca_ViT-B-32", "coca_ViT-L-14", "test-tiny"):
        assert required in names
    for name in names:
        cfg = get_preset(name)
        assert CoCaConfig.from_dict(json.loads(cfg.to_json())) == cfg


def _count(name):
    with torch.device("meta"):
        model = CoCa(get_preset(name))
    return {part: sum(p.numel() for p in getattr(model, part).parameters())
            for part in ("visual", "text", "decoder")} | {"total": sum(p.numel() for p in model.parameters())}


def test_open_clip_presets_have_open_clip_sizes():
    # Parameter counts of open_clip's own models (FACTS.md).
    b32 = _count("coca_ViT-B-32")
    assert b32 == {"visual": 89_164_032, "text": 63_428_608, "decoder": 100_967_424, "total": 253_560_065}
    assert _count("coca_ViT-L-14")["total"] == 638_450_177


@pytest.mark.parametrize("name,target", [("coca_ViT-S-32", 1 / 4), ("coca_ViT-Ti-32", 1 / 10),
                                         ("coca_ViT-Mi-32", 1 / 20)])
def test_student_sizes(name, target):
    ratio = _count(name)["total"] / _count("coca_ViT-B-32")["total"]
    assert 0.8 * target < ratio < 1.2 * target, ratio


def test_unknown_key_is_an_error():
    data = get_preset("test-tiny").to_dict()
    data["vision"]["widht"] = 3
    with pytest.raises(ConfigError, match=r"vision: unknown key\(s\) \['widht'\]"):
        CoCaConfig.from_dict(data)


@pytest.mark.parametrize("section,key,value,match", [
    ("vision", "image_size", 30, "divisible by vision.patch_size"),
    ("text", "heads", 3, "divisible by text.heads"),
    ("decoder", "width", 128, "must equal decoder.width"),
    ("text", "layers", 0, "positive integer"),
    (None, "sot_token_id", 50000, "sot_token_id"),
])
def test_validation(section, key, value, match):
    data = get_preset("test-tiny").to_dict()
    (data[section] if section else data)[key] = value
    with pytest.raises(ConfigError, match=match):
        CoCaConfig.from_dict(data)


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="available: .*coca_ViT-B-32"):
        get_preset("coca_ViT-H-14")
