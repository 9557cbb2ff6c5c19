"""Bad checkpoints fail with messages that name the problem (no open_clip needed)."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from coca_edge.models.openclip import (
    CheckpointError,
    config_from_open_clip,
    config_to_open_clip,
    load_checkpoint,
    save_open_clip,
    to_open_clip,
)
from coca_edge.models import ConfigError


@pytest.fixture()
def oc_state(tiny_model, tiny_config):
    return {k: v.clone() for k, v in to_open_clip(tiny_model.state_dict(), tiny_config).items()}


def test_missing_unexpected_and_misshaped_keys(tmp_path, oc_state):
    del oc_state["visual.conv1.weight"]
    del oc_state["text_decoder.ln_final.bias"]
    oc_state["visual.extra_head.weight"] = torch.zeros(2)
    oc_state["text.positional_embedding"] = torch.zeros(78, 64)
    torch.save(oc_state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.bin", preset="test-tiny")
    msg = str(info.value)
    assert "preset 'test-tiny'" in msg
    assert "2 missing key(s): visual.conv1.weight, text_decoder.ln_final.bias" in msg
    assert "1 unexpected key(s): visual.extra_head.weight" in msg
    assert "text.positional_embedding (checkpoint [78, 64], expected [77, 64])" in msg


def test_wrong_preset_is_named(tmp_path, oc_state):
    torch.save(oc_state, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match="does not match preset 'coca_ViT-Mi-32'.*more"):
        load_checkpoint(tmp_path / "w.bin", preset="coca_ViT-Mi-32")


def test_pickled_object_is_refused(tmp_path, tiny_model):
    torch.save(tiny_model, tmp_path / "model.pt")  # a whole nn.Module, not a state dict
    with pytest.raises(CheckpointError, match="not a plain state dict.*refuses to unpickle"):
        load_checkpoint(tmp_path / "model.pt", preset="test-tiny")


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"visual.conv1.weight": [1, 2, 3]}, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="non-tensor entries: visual.conv1.weight"):
        load_checkpoint(tmp_path / "x.bin", preset="test-tiny")


def test_nan_and_inf_are_named(tmp_path, oc_state):
    oc_state["text.token_embedding.weight"][3, 2] = float("nan")
    oc_state["visual.proj"][0, 0] = float("inf")
    torch.save(oc_state, tmp_path / "nan.bin")
    with pytest.raises(CheckpointError, match="NaN/Inf values in .*visual.proj.*text.token_embedding.weight"
                                              "|NaN/Inf values in .*text.token_embedding.weight.*visual.proj"):
        load_checkpoint(tmp_path / "nan.bin", preset="test-tiny")


@pytest.mark.parametrize("name,content", [("empty.bin", b""), ("junk.bin", b"not a checkpoint at all"),
                                          ("junk.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")])
def test_unreadable_files(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(tmp_path / name, preset="test-tiny")


def test_missing_path_and_preset(tmp_path, oc_state):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.bin", preset="test-tiny")
    torch.save(oc_state, tmp_path / "w.bin")
    with pytest.raises(CheckpointError, match="pass a preset"):
        load_checkpoint(tmp_path / "w.bin")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors"):
        load_checkpoint(tmp_path / "dir")


def test_half_precision_checkpoint_loads(tmp_path, oc_state, tiny_model):
    torch.save({k: v.half() for k, v in oc_state.items()}, tmp_path / "fp16.bin")
    model = load_checkpoint(tmp_path / "fp16.bin", preset="test-tiny")
    ref = tiny_model.state_dict()["visual.proj"].half().float()
    assert torch.equal(model.state_dict()["visual.proj"], ref)


def test_hub_snapshot_round_trip(tmp_path, tiny_model):
    save_open_clip(tiny_model, tmp_path / "snap")
    assert (tmp_path / "snap" / "open_clip_config.json").is_file()
    loaded = load_checkpoint(tmp_path / "snap")
    assert loaded.config.vision == tiny_model.config.vision
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_config_translation_round_trip(tiny_config):
    cfg = config_from_open_clip(config_to_open_clip(tiny_config), name="test-tiny")
    assert (cfg.vision, cfg.text, cfg.decoder, cfg.embed_dim) == (
        tiny_config.vision, tiny_config.text, tiny_config.decoder, tiny_config.embed_dim)


def test_open_clip_b32_json_translates():
    # open_clip's own model_configs/coca_ViT-B-32.json, verbatim.
    data = {"embed_dim": 512,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32,
                           "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
            "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                         "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8,
                               "layers": 12, "attn_pooler_heads": 8},
            "custom_text": True}
    from coca_edge.models import get_preset
    ref = get_preset("coca_ViT-B-32")
    cfg = config_from_open_clip(data)
    assert (cfg.vision, cfg.text, cfg.decoder, cfg.embed_dim) == (ref.vision, ref.text, ref.decoder, ref.embed_dim)


@pytest.mark.parametrize("section,key,value", [("vision_cfg", "ls_init_value", 1e-5),
                                               ("text_cfg", "hf_model_name", "roberta-base"),
                                               ("vision_cfg", "attentional_pool", False)])
def test_unsupported_open_clip_options(tiny_config, section, key, value):
    data = config_to_open_clip(tiny_config)
    data["model_cfg"][section][key] = value
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        config_from_open_clip(data, name="custom")
