"""Accuracy-aware fallback on the test-tiny bundle: a gate the plain INT8 run fails is passed by
returning the fewest nodes to FP32; a gate no mix can pass writes nothing and exits 1."""
from __future__ import annotations

import json

import pytest

from coca_edge.calibration import CalibrationData
from coca_edge.quantize import AutoFallbackConfig, Fp32Config, Int8StaticConfig, quantize
from coca_edge.quantize.fallback import FallbackFailed

GATE = "image_encoder.image_embed.cosine_min"
CALIB = CalibrationData("synthetic-scenes:train", samples=8, batch_size=4, decoder_images=4, decoder_steps=2,
                        max_new_tokens=4)
# s8s8 MinMax on the image encoder only: the lossiest static setting (FACTS: cosine 0.995 on
# coca_ViT-B-32), so the plain run has drift to recover; the other graphs stay FP32.
PLAN = {"image_encoder": Int8StaticConfig(method="minmax", activation_type="int8", symmetric_activations=True),
        "text_encoder": Fp32Config(), "cross_kv": Fp32Config(), "decoder": Fp32Config()}


def _gates(path, threshold: float):
    path.write_text(f'gates:\n  {GATE}: ">= {threshold!r}"\n')
    return str(path)


def test_fallback_passes_a_gate_plain_int8_fails(tiny_bundle, tmp_path):
    from coca_edge.validate import Validator

    src, _ = tiny_bundle
    plain = quantize(src, PLAN, tmp_path / "plain", CALIB, progress=False, cache_dir=tmp_path / "cache")
    measured = Validator(src, "synthetic-scenes:val", 8, progress=False).evaluate(plain, latency=False).metrics[GATE]
    assert measured < 0.99999
    # Just above the plain run: it fails; all quantized nodes in FP32 gives cosine 1, so a mix exists.
    gates = _gates(tmp_path / "gates.yaml", measured + (1 - measured) * 0.1)
    out = quantize(src, AutoFallbackConfig(PLAN, gates=gates, eval_samples=8, max_nodes=32), tmp_path / "auto",
                   CALIB, progress=False, cache_dir=tmp_path / "cache")
    manifest = json.loads((out / "manifest.json").read_text())
    fallback = manifest["quantization"]["fallback"]
    steps = fallback["steps"]
    assert not steps[0]["passed"] and steps[0]["excluded"] == []
    assert steps[-1]["passed"] or any(s["passed"] for s in steps)
    nodes = fallback["fallback_nodes"]
    assert 1 <= len(nodes) <= 32
    excluded = manifest["graphs"]["image_encoder"]["quantization"]["excluded_nodes"]
    assert [f"image_encoder/{n}" for n in excluded] == nodes
    # The shortest passing prefix: one node fewer failed (or it is the first node).
    passing = [s for s in steps if s["passed"]]
    assert min(len(s["excluded"]) for s in passing) == len(nodes)
    assert all("node(s) FP32" in s["summary"] for s in steps)


def test_no_mix_passes_writes_nothing(tiny_bundle, tmp_path, capsys):
    from coca_edge.cli import main

    src, _ = tiny_bundle
    # Cosine cannot exceed 1: no mix passes.
    gates = _gates(tmp_path / "impossible.yaml", 1.5)
    with pytest.raises(FallbackFailed, match="no mix passes") as failed:
        quantize(src, AutoFallbackConfig(PLAN, gates=gates, eval_samples=4, max_nodes=1), tmp_path / "out",
                 CALIB, progress=False, cache_dir=tmp_path / "cache")
    # every mix tried is reported, with the gate it failed
    assert [len(s.excluded) for s in failed.value.steps] == [0, 1]
    assert "mixes tried:" in str(failed.value) and str(failed.value).count("violates") >= 2
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    code = main(["quantize", str(src), "--precision", "int8", "--preset", "cpu", "--gates", gates,
                 "--eval-samples", "4", "--max-fallback-nodes", "1", "--out", str(tmp_path / "cli"), "--json"])
    assert code == 1 and "no mix passes" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_block_packed_head_is_the_first_fallback_candidate(tiny_bundle):
    """The head decides every argmax but ranks last by SQNR, so the fallback tries it first."""
    import onnx

    from coca_edge.quantize import Int8DynamicConfig
    from coca_edge.quantize.fallback import _packed_head
    from coca_edge.quantize.methods import _producers

    src, _ = tiny_bundle
    graphs = {"decoder": onnx.load(str(src / "decoder.onnx"), load_external_data=False)}
    head = _producers(graphs["decoder"], "logits")
    assert head and _packed_head({"decoder": Int8DynamicConfig()}, graphs) == head
    assert _packed_head({"decoder": Int8DynamicConfig(logits_block_bits=0)}, graphs) == []
    assert _packed_head({"decoder": Int8DynamicConfig(keep_logits=False)}, graphs) == []
    assert _packed_head({"decoder": Int8DynamicConfig(exclude_nodes=tuple(head))}, graphs) == []
    assert _packed_head({"decoder": Int8StaticConfig()}, graphs) == []


def test_blame_goes_to_nodes_with_weights(tiny_bundle):
    """Error that shows after attention is charged to the projection feeding it, not to the
    attention's activation x activation MatMuls, which no INT8 method changes (returning them
    to FP32 would buy nothing; with fused attention they are not even in the quantized graph)."""
    import onnx

    from coca_edge.quantize.fallback import _blame

    model = onnx.load(str(tiny_bundle[0] / "decoder.onnx"), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    after = next(n for n in model.graph.node if softmax.output[0] in n.input)
    mixed = next(n for n in model.graph.node if after.output[0] in n.input)  # probs x V: no weight
    assert mixed.op_type == "MatMul" and not set(mixed.input) & weights
    ops = ("MatMul", "Gemm", "Gather")
    blamed = _blame(model, mixed.name, ops)
    assert blamed and mixed.name not in blamed
    for name in blamed:
        node = next(n for n in model.graph.node if n.name == name)
        assert node.op_type == "MatMul" and node.input[1] in weights, name
    # the first Gather of the decoder picks the token embedding (a weight): blamed as itself
    emb = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights)
    assert _blame(model, emb.name, ops) == [emb.name]
    # a Gather picking q / k / v out of a computed tensor is not: the blame moves upstream
    pick = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in producer)
    assert pick.name not in _blame(model, pick.name, ops)
