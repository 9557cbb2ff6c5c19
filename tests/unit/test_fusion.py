"""Attention fusion (``fuse_attention``, quantize/fusion.py): the decoder's attention blocks as ORT
MultiHeadAttention compute what the exported graph computes, in both cache layouts, and the
option refuses what it cannot fuse."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from coca_edge.quantize import Fp32Config, Int8DynamicConfig, QuantizeError, WeightOnlyConfig, config_from_dict, \
    preset_plan, quantize
from coca_edge.quantize.methods import count_ops
from coca_edge.runtime import EdgeCoCa
from coca_edge.runtime.bundle import required_onnxruntime
from coca_edge.runtime.generation import fit_cache_feed

GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")


@pytest.fixture(scope="module")
def layouts(tiny_bundle, tmp_path_factory):
    """The session's tiny model in both cache layouts, each with its decoder INT8 with and without fusion."""
    from coca_edge.exporters.bundle import export_bundle

    root = tmp_path_factory.mktemp("fusion")
    sources = {"per-layer": tiny_bundle[0],
               "stacked": export_bundle(tiny_bundle[1], root / "stacked", cache_layout="stacked", progress=False)}
    out = {}
    for name, src in sources.items():
        plain = {g: Fp32Config() for g in GRAPHS}
        plain["decoder"] = Int8DynamicConfig()
        fused = {**plain, "decoder": Int8DynamicConfig(fuse_attention=True)}
        out[name] = (src, quantize(src, fused, root / f"{name}-fused", progress=False),
                     quantize(src, plain, root / f"{name}-plain", progress=False))
    return out


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("layout", ["per-layer", "stacked"])
def test_fused_decoder_computes_what_the_exported_one_does(layouts, tiny_bundle, layout):
    src, fused, plain = layouts[layout]
    manifest = json.loads((fused / "manifest.json").read_text())["graphs"]["decoder"]
    model = tiny_bundle[1].config
    # every attention block fused: text tower + decoder self-attention, decoder cross-attention
    assert manifest["quantization"]["fused_attention"] == {"self": model.text.layers + model.decoder.layers,
                                                           "cross": model.decoder.layers}
    ops = count_ops(fused / "decoder.onnx")
    assert ops["MultiHeadAttention"] == model.text.layers + 2 * model.decoder.layers and "Softmax" not in ops
    assert "MultiHeadAttention" in manifest["contrib_ops"]
    assert required_onnxruntime(manifest)[0] == "1.20"
    # the same dynamic-INT8 decoder unfused is the reference: prefill several tokens from an empty
    # cache (the causal mask), then one and two new tokens after a past of 3
    edge = EdgeCoCa.load(src)
    a, b = _session(fused / "decoder.onnx"), _session(plain / "decoder.onnx")
    names = [i.name for i in a.get_inputs()]
    assert names == [i.name for i in b.get_inputs()]
    rng = np.random.default_rng(0)
    pixels = rng.random((3, 3, 32, 32)).astype(np.float32)
    cross = edge.cross_kv(pixels)
    cross_feed = {f"cross_{kv}_{i}": np.ascontiguousarray(cross[i, j])
                  for i in range(cross.shape[0]) for j, kv in enumerate("kv")}
    past = edge.layout.empty_past(3)
    for ids in (rng.integers(1, 400, (3, 4)), rng.integers(1, 400, (3, 1)), rng.integers(1, 400, (3, 2))):
        feed = fit_cache_feed({"input_ids": ids.astype(np.int64), **past, **cross_feed}, names)
        outs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, feed))) for s in (a, b)]
        assert outs[0].keys() == outs[1].keys()
        for name in outs[1]:
            np.testing.assert_allclose(outs[0][name], outs[1][name], atol=2e-4, rtol=1e-4, err_msg=name)
        past = edge.layout.for_inputs(names).next_past(outs[1])
    # and captions: greedy and beam (beam reorders the cache rows)
    images = list((rng.random((3, 32, 32, 3)) * 255).astype(np.uint8))
    x, y = EdgeCoCa.load(fused), EdgeCoCa.load(plain)
    for gen in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}):
        assert x.caption_ids(images, max_new_tokens=6, **gen).sequences == \
            y.caption_ids(images, max_new_tokens=6, **gen).sequences


def test_cpu_preset_fuses_only_the_decoder(tiny_bundle, tmp_path):
    for precision, cls in (("int8", Int8DynamicConfig), ("int4", WeightOnlyConfig)):
        plan = preset_plan("cpu", precision)
        assert isinstance(plan["decoder"], cls) and plan["decoder"].fuse_attention
        assert not any(getattr(plan[g], "fuse_attention", False) for g in GRAPHS if g != "decoder")
        assert config_from_dict(plan["decoder"].to_dict()) == plan["decoder"]
    for preset in ("arm64", "tensorrt"):
        assert not any(getattr(c, "fuse_attention", False) for c in preset_plan(preset, "int8").values())
    out = quantize(tiny_bundle[0], preset_plan("cpu", "int4"), tmp_path / "int4", progress=False)
    q = json.loads((out / "manifest.json").read_text())["graphs"]["decoder"]["quantization"]
    assert q["fused_attention"]["cross"] == tiny_bundle[1].config.decoder.layers
    assert count_ops(out / "decoder.onnx").get("MatMulNBits", 0) > 0
    assert len(EdgeCoCa.load(out).caption(list(np.zeros((2, 32, 32, 3), np.uint8)), max_new_tokens=3)) == 2


def test_fuse_attention_flag_overrides_the_preset(tiny_bundle, tmp_path, capsys):
    from coca_edge.cli import main

    assert not preset_plan("cpu", "int8", fuse_attention=False)["decoder"].fuse_attention
    assert preset_plan("arm64", "int8", "dynamic", fuse_attention=True)["decoder"].fuse_attention
    assert preset_plan("cpu", "int8", "static", fuse_attention=False) == preset_plan("cpu", "int8", "static")
    out = tmp_path / "plain"
    assert main(["quantize", str(tiny_bundle[0]), "--precision", "int8", "--no-fuse-attention", "--out", str(out),
                 "--json"]) == 0
    q = json.loads((out / "manifest.json").read_text())["graphs"]["decoder"]["quantization"]
    assert "fused_attention" not in q and count_ops(out / "decoder.onnx").get("MultiHeadAttention", 0) == 0
    capsys.readouterr()
    for method in ("static", None):
        args = ["--method", method] if method else []
        precision = "int8" if method else "fp16"
        assert main(["quantize", str(tiny_bundle[0]), "--precision", precision, *args, "--fuse-attention",
                     "--out", str(tmp_path / f"refused-{precision}")]) == 2
        assert "cannot fuse attention" in capsys.readouterr().err
        assert not (tmp_path / f"refused-{precision}").exists()


def test_fusion_refuses_what_it_cannot_fuse(tiny_bundle, tmp_path):
    with pytest.raises(QuantizeError, match="fuse_attention must be true or false"):
        Int8DynamicConfig(fuse_attention="yes")
    with pytest.raises(QuantizeError, match="format='qdq' is for TensorRT"):
        WeightOnlyConfig(format="qdq", op_types=("MatMul",), fuse_attention=True)
    # the image encoder's attention is not the decoder's pattern: a clear error, nothing written
    plan = {g: Fp32Config() for g in GRAPHS}
    plan["image_encoder"] = Int8DynamicConfig(fuse_attention=True)
    with pytest.raises(QuantizeError, match=r"image_encoder: fuse_attention: .*left unfused"):
        quantize(tiny_bundle[0], plan, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
