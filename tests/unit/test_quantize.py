"""coca_edge.quantize on the test-tiny bundle: every preset and precision, node counts, exclusions,
calibration cache, bad input, CLI exit codes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from coca_edge.calibration import CalibrationData, CalibrationError
from coca_edge.quantize import (
    Fp16Config,
    Fp32Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeError,
    WeightOnlyConfig,
    config_from_dict,
    preset_plan,
    quantize,
)
from coca_edge.quantize.methods import _producers, count_ops
from coca_edge.runtime import EdgeCoCa

GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")
# Small calibration: enough for every graph to see real feeds, fast on 2 cores.
CALIB = CalibrationData("synthetic-scenes:train", samples=8, batch_size=4, decoder_images=4, decoder_steps=3,
                        max_new_tokens=5)
COMBOS = [("cpu", "int8", None), ("cpu", "int8", "static"), ("cpu", "int4", None), ("cpu", "fp16", None),
          ("arm64", "int8", None), ("arm64", "int8", "dynamic"), ("arm64", "int4", None), ("tensorrt", "int8", None),
          ("tensorrt", "int4", None), ("tensorrt", "fp16", None), ("gpu-fp16", "fp16", None)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("calib-cache")


@pytest.fixture(scope="module")
def images():
    from coca_edge.data import SyntheticScenes

    return list(SyntheticScenes("val", image_size=32, length=3).batch(range(3))[0])


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _const_matmuls(path: Path) -> int:
    """MatMuls whose B input is an initializer (what weight-only quantization can pack)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits)


@pytest.mark.parametrize("preset,precision,method", COMBOS)
def test_every_preset_quantizes_every_graph(tiny_bundle, tmp_path, cache_dir, images, preset, precision, method):
    src, _ = tiny_bundle
    plan = preset_plan(preset, precision, method)
    out = quantize(src, plan, tmp_path / "q", CALIB, progress=False, cache_dir=cache_dir)
    manifest = _manifest(out)
    assert set(manifest["graphs"]) == set(GRAPHS)
    assert manifest["source_bundle"] == str(Path(src).resolve())
    assert len(manifest["quantization"]["source_bundle"]["manifest_sha256"]) == 64
    for graph, meta in manifest["graphs"].items():
        cfg = plan[graph]
        assert meta["precision"] == cfg.precision
        q = meta["quantization"]
        assert q["method"] == cfg.kind and config_from_dict(q["config"]) == cfg
        ops = count_ops(out / meta["file"])
        if isinstance(cfg, Int8StaticConfig):
            assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0, graph
            assert q["calibration"]["cache"] in ("hit", "miss")
        elif isinstance(cfg, Int8DynamicConfig):
            assert ops.get("DynamicQuantizeLinear", 0) > 0, graph
        elif isinstance(cfg, WeightOnlyConfig) and cfg.format == "matmulnbits":
            assert ops.get("MatMulNBits", 0) == _const_matmuls(src / f"{graph}.onnx"), graph
            assert ops.get("GatherBlockQuantized", 0) >= 1, graph  # the token embedding
        elif isinstance(cfg, WeightOnlyConfig):
            assert ops.get("DequantizeLinear", 0) == _const_matmuls(src / f"{graph}.onnx"), graph
        elif isinstance(cfg, Fp16Config):
            inits = onnx.load(str(out / meta["file"])).graph.initializer
            assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits), graph
            assert meta["inputs"] == _manifest(src)["graphs"][graph]["inputs"]  # FP32 IO kept
    edge = EdgeCoCa.load(out)
    captions = edge.caption(images, max_new_tokens=4)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert edge.encode_text(["a red circle"]).shape == (1, 64)


def test_fp16_keeps_logits_and_blocked_ops_fp32(tiny_bundle, tmp_path):
    src, _ = tiny_bundle
    out = quantize(src, {g: Fp16Config() if g == "decoder" else Fp32Config() for g in GRAPHS}, tmp_path / "q",
                   progress=False)
    blocked = _manifest(out)["graphs"]["decoder"]["quantization"]["blocked_nodes"]
    model = onnx.load(str(out / "decoder.onnx"))
    nodes = {n.name: n for n in model.graph.node}
    assert blocked and nodes[blocked[-1]].op_type == "MatMul"  # the logits projection
    # A blocked node reads FP32: a Cast to FP32 (to=1) feeds it.
    producers = {o: n for n in model.graph.node for o in n.output}
    feeding = [producers[i] for i in nodes[blocked[-1]].input if i in producers]
    assert any(p.op_type == "Cast" and p.attribute[0].i == 1 for p in feeding)


@pytest.mark.parametrize("keep,bits", [(True, 0), (False, 0), (True, 8)])
def test_int8_keeps_the_logits_head_out_of_per_tensor_int8(tiny_bundle, tmp_path, keep, bits):
    src, _ = tiny_bundle
    plan = {g: Fp32Config() for g in GRAPHS}
    plan["decoder"] = Int8DynamicConfig(keep_logits=keep, logits_block_bits=bits)
    out = quantize(src, plan, tmp_path / "q", progress=False)
    head = _producers(onnx.load(str(src / "decoder.onnx"), load_external_data=False), "logits")
    assert head  # the vocabulary projection MatMul (and what follows it)
    q = _manifest(out)["graphs"]["decoder"]["quantization"]
    assert q["kept_fp32"] == (head if keep and not bits else [])
    graph = onnx.load(str(out / "decoder.onnx")).graph
    out_nodes = {n.name: n.op_type for n in graph.node}
    assert (out_nodes.get(head[-1]) == "MatMul") is (keep and not bits)  # else MatMulInteger / MatMulNBits
    ops = count_ops(out / "decoder.onnx")
    assert ops.get("MatMulInteger", 0) > 0
    if bits:
        # exactly the head is block-packed, at the configured width, and it produces the logits
        assert q["block_packed"] == head and ops.get("MatMulNBits", 0) == 1
        packed = next(n for n in graph.node if n.op_type == "MatMulNBits")
        assert {a.name: a.i for a in packed.attribute}["bits"] == bits
        producers = {o: n for n in graph.node for o in n.output}
        assert producers["logits"].op_type == "MatMulNBits" or any(
            i in {o for o in packed.output} for i in producers["logits"].input)
    else:
        assert ops.get("MatMulNBits", 0) == 0


def test_int8_block_packed_head_stays_close_to_fp32(tiny_bundle, tmp_path):
    """8-bit blocks of the head: the logits stay within a small fraction of their spread."""
    from coca_edge.runtime import EdgeCoCa

    src, _ = tiny_bundle
    plan = {g: Fp32Config() for g in GRAPHS}
    plan["decoder"] = Int8DynamicConfig(op_types=("Gemm",), logits_block_bits=8)  # only the head changes
    out = quantize(src, plan, tmp_path / "q", progress=False)
    ref, cand = EdgeCoCa.load(src), EdgeCoCa.load(out)
    from coca_edge.runtime.generation import decoder_feed

    pixels = np.random.default_rng(0).standard_normal((2, 3, ref.image_size, ref.image_size)).astype(np.float32)
    feeds = []
    for rt in (ref, cand):
        cross = rt.cross_kv(pixels)
        ids = np.full((2, 3), rt.layout.sot_token_id, np.int64)
        feeds.append(rt.runners["decoder"].run(decoder_feed(ids, rt.layout.empty_past(2), cross))["logits"])
    err = np.abs(feeds[0] - feeds[1]).max()
    # 8-bit symmetric blocks round each weight to 1/254 of its block's range; with int8 activations
    # per block too, measured 0.4% of the logit spread on test-tiny. 2% leaves room for other seeds.
    assert 0 < err < 0.02 * (feeds[0].max() - feeds[0].min())


def test_excluded_nodes_stay_fp32(tiny_bundle, tmp_path, cache_dir):
    src, _ = tiny_bundle
    graph = onnx.load(str(src / "decoder.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    matmul = next(n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    plan = {g: Fp32Config() for g in GRAPHS}
    plan["decoder"] = WeightOnlyConfig(bits=4, exclude_nodes=(matmul,))
    plan["image_encoder"] = Int8StaticConfig(exclude_nodes=("node_MatMul_23",))
    out = quantize(src, plan, tmp_path / "q", CALIB, progress=False, cache_dir=cache_dir)
    manifest = _manifest(out)
    assert manifest["graphs"]["decoder"]["quantization"]["excluded_nodes"] == [matmul]
    assert count_ops(out / "decoder.onnx")["MatMulNBits"] == _const_matmuls(src / "decoder.onnx") - 1
    dec = {n.name: n for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    assert dec[matmul].op_type == "MatMul"
    enc = onnx.load(str(out / "image_encoder.onnx")).graph
    producers = {o: n for n in enc.node for o in n.output}
    node = next(n for n in enc.node if n.name == "node_MatMul_23")
    assert not any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input)
    assert manifest["graphs"]["text_encoder"]["precision"] == "fp32"
    with pytest.raises(QuantizeError, match="not nodes of"):
        quantize(src, WeightOnlyConfig(exclude_nodes=("no_such_node",)), tmp_path / "bad", progress=False)


def test_calibration_cache_hit_on_second_run(tiny_bundle, tmp_path):
    src, _ = tiny_bundle
    # Entropy on the small cross_kv graph (its histogram path is slow on the decoder), MinMax on the decoder.
    plan = {g: Fp32Config() for g in GRAPHS}
    plan.update(cross_kv=Int8StaticConfig(method="entropy"), decoder=Int8StaticConfig(method="minmax"))
    first = _manifest(quantize(src, plan, tmp_path / "a", CALIB, progress=False, cache_dir=tmp_path / "c"))
    second_out = quantize(src, plan, tmp_path / "b", CALIB, progress=False, cache_dir=tmp_path / "c")
    second = _manifest(second_out)
    for graph in ("cross_kv", "decoder"):
        a, b = first["graphs"][graph], second["graphs"][graph]
        assert a["quantization"]["calibration"]["cache"] == "miss"
        assert b["quantization"]["calibration"]["cache"] == "hit"
        assert a["quantization"]["calibration"]["key"] == b["quantization"]["calibration"]["key"]
        assert a["quantization"]["calibration"]["feeds"] > 0
        assert first["files"][a["file"]]["sha256"] == second["files"][b["file"]]["sha256"]
    assert len(list((tmp_path / "c").glob("*.json"))) == 2
    # Different data -> a different key -> a miss.
    other = CalibrationData("synthetic-scenes:train", samples=4, batch_size=4, decoder_images=4, decoder_steps=2,
                            max_new_tokens=5)
    third = _manifest(quantize(src, plan, tmp_path / "d", other, progress=False, cache_dir=tmp_path / "c"))
    assert third["graphs"]["decoder"]["quantization"]["calibration"]["cache"] == "miss"


def test_bad_inputs(tiny_bundle, tmp_path, cache_dir):
    src, _ = tiny_bundle
    q = quantize(src, Int8DynamicConfig(), tmp_path / "q", progress=False)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(q, Int8DynamicConfig(), tmp_path / "qq", progress=False)
    with pytest.raises(QuantizeError, match="unknown preset"):
        preset_plan("jetson-nano", "int8")
    with pytest.raises(QuantizeError, match="no int8"):
        preset_plan("gpu-fp16", "int8")
    with pytest.raises(QuantizeError, match="needs calibration"):
        quantize(src, Int8StaticConfig(), tmp_path / "nocal", progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        quantize(src, Int8StaticConfig(), tmp_path / "empty", np.zeros((0, 3, 32, 32), np.float32), progress=False)
    with pytest.raises(CalibrationError, match=r"\[N, 3, 32, 32\]"):
        quantize(src, Int8StaticConfig(), tmp_path / "size", np.zeros((4, 3, 224, 224), np.float32), progress=False)
    with pytest.raises(QuantizeError, match="in place"):
        quantize(src, Int8DynamicConfig(), src, progress=False)
    with pytest.raises(QuantizeError, match="not empty"):
        quantize(src, Int8DynamicConfig(), q, progress=False)
    with pytest.raises(QuantizeError, match="no config for graph"):
        quantize(src, {"decoder": Int8DynamicConfig()}, tmp_path / "partial", progress=False)
    with pytest.raises(QuantizeError, match="bits"):
        WeightOnlyConfig(bits=3)
    with pytest.raises(QuantizeError, match="method"):
        Int8StaticConfig(method="mse")
    for name in ("nocal", "empty", "size", "partial"):
        assert not (tmp_path / name).exists()


def test_interrupted_run_leaves_nothing(tiny_bundle, tmp_path, monkeypatch):
    from coca_edge.quantize import methods

    src, _ = tiny_bundle
    real = methods._REGISTRY[Int8DynamicConfig]
    calls = []

    def interrupt_on_second(job):
        calls.append(job.graph)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setitem(methods._REGISTRY, Int8DynamicConfig, interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        quantize(src, Int8DynamicConfig(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a staging folder


def test_cli_exit_codes(tiny_bundle, tmp_path, cache_dir, capsys):
    from coca_edge.cli import main

    src, _ = tiny_bundle
    out = tmp_path / "int4"
    assert main(["quantize", str(src), "--precision", "int4", "--preset", "cpu", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["graphs"]["decoder"]["precision"] == "int4-weight-only"
    assert summary["graphs"]["decoder"]["bytes"] < summary["graphs"]["decoder"]["fp32_bytes"]
    assert main(["quantize", str(out), "--precision", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(src), "--precision", "int8", "--preset", "nope", "--out", str(tmp_path / "y")]) == 2
    assert main(["quantize", str(src), "--precision", "int8", "--method", "static", "--calib", "/missing.csv",
                 "--out", str(tmp_path / "z")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
