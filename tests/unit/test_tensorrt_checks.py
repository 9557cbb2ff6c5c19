"""Structural TensorRT checks, without TensorRT: the tiny FP32 / FP16 / INT8 bundles pass, and a
graph built to break each rule fails it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from coca_edge.exporters.trt_checks import (check_bundle, check_ops, check_profiles, check_qdq, load_support_table,
                                            runtime_feed_shapes)
from coca_edge.runtime.bundle import Bundle
from coca_edge.runtime.trt import ProfileConfig, derive_profiles


def _model(nodes, inputs, outputs, initializers=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


# -- the bundles pass ---------------------------------------------------------------------
VARIANTS = ["fp32", "fp16-preset", "int8-ort", "int8-preset"]


@pytest.fixture()
def variant_bundle(request, tiny_bundle):
    fixture = {"fp32": None, "fp16-preset": "tiny_fp16_bundle", "int8-ort": "tiny_int8_ort_bundle",
               "int8-preset": "tiny_int8_trt_bundle"}[request.param]
    return tiny_bundle[0] if fixture is None else request.getfixturevalue(fixture)


@pytest.mark.parametrize("variant_bundle", VARIANTS, indirect=True)
def test_tiny_bundles_pass_every_check(variant_bundle):
    bundle = Bundle.load(variant_bundle)
    config = ProfileConfig(max_batch=4, num_beams=2)
    int8 = any(g["precision"].startswith("int8") for g in bundle.manifest["graphs"].values())
    found = check_bundle(bundle, derive_profiles(bundle, config), config.max_batch, config.num_beams, qdq=int8)
    assert set(found) == {"image_encoder", "text_encoder", "cross_kv", "decoder"}
    assert {g: [str(v) for v in vs] for g, vs in found.items()} == {g: [] for g in found}


def test_preset_int8_quantizes_cross_kv_on_the_output_channel(tiny_int8_trt_bundle):
    """The batched cross K/V weight [L, 2, 1, H, W+1, D] is per-channel on its last axis (the
    output channel), not on ORT's default axis 1 (K/V): the preset sets channel_axis=-1."""
    model = onnx.load(str(tiny_int8_trt_bundle / "cross_kv.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].ndim == 6]
    assert weight_dq
    for node in weight_dq:
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert axis in (-1, 5), axis
        assert inits[node.input[1]].shape == (inits[node.input[0]].shape[-1],)


@pytest.mark.parametrize("name", ["tiny_int8_ort_bundle", "tiny_int8_trt_bundle"])
def test_int8_bundles_really_are_explicitly_quantized(name, request):
    """Guards the INT8 checks against passing vacuously: Q/DQ pairs are there, weights per-channel."""
    model = onnx.load(str(request.getfixturevalue(name) / "decoder.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > ops.count("QuantizeLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                   and inits[n.input[1]].size > 1]
    assert per_channel


def test_support_table_cites_its_source():
    table = load_support_table()
    assert "onnx-tensorrt" in table.source and "operators.md" in table.source
    assert table.opset_min <= 20 <= table.opset_max  # the exporter's default opset
    assert table.ops["DynamicQuantizeLinear"]["supported"] is False


# -- check_ops fails on graphs built to break it -----------------------------------------
def test_unsupported_op_fails():
    # ORT's dynamic quantization emits DynamicQuantizeLinear: an int8-dynamic bundle cannot build
    model = _model([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="dq")],
                   [_vi("x", TensorProto.FLOAT, [2, 3])],
                   [_vi("y", TensorProto.UINT8, [2, 3]), _vi("s", TensorProto.FLOAT, []),
                    _vi("z", TensorProto.UINT8, [])])
    (v,) = check_ops(model, "g")
    assert v.node == "dq" and "DynamicQuantizeLinear" in v.message


def test_custom_domain_op_fails():
    model = _model([helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fm", domain="com.microsoft")],
                   [_vi("a", TensorProto.FLOAT, [2, 3]), _vi("b", TensorProto.FLOAT, [3, 2])],
                   [_vi("y", TensorProto.FLOAT, [2, 2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    (v,) = check_ops(model, "g")
    assert "plugin" in v.message


def test_unsupported_dtype_fails():
    # TensorRT's MatMul is float-only (FP32/FP16/BF16); int32 MatMul is not in the table
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                   [_vi("a", TensorProto.INT32, [2, 3]), _vi("b", TensorProto.INT32, [3, 2])],
                   [_vi("y", TensorProto.INT32, [2, 2])])
    (v,) = check_ops(model, "g")
    assert v.node == "mm" and "int32" in v.message


def test_unsupported_attribute_fails():
    k = numpy_helper.from_array(np.array([2], dtype=np.int64), "k")
    model = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", sorted=0)],
                   [_vi("x", TensorProto.FLOAT, [2, 5])],
                   [_vi("v", TensorProto.FLOAT, [2, 2]), _vi("i", TensorProto.INT64, [2, 2])], [k])
    (v,) = check_ops(model, "g")
    assert "sorted=0" in v.message


def test_non_constant_axes_fail():
    model = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="rm")],
                   [_vi("x", TensorProto.FLOAT, [2, 5]), _vi("axes", TensorProto.INT64, [1])],
                   [_vi("y", TensorProto.FLOAT, None)], opset=18)
    (v,) = check_ops(model, "g")
    assert "build-time constant" in v.message


def test_opset_outside_the_claimed_range_fails():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [2])],
                   [_vi("y", TensorProto.FLOAT, [2])], opset=23)
    assert any("opset 23" in v.message for v in check_ops(model, "g"))


# -- check_qdq fails on graphs built to break it -----------------------------------------
def _qdq_matmul(zp_dtype=np.int8, zp_value=0, weight_axis=1, weight_scale_size=4, act_scale_size=1,
                q_feeds_matmul=False):
    """x -> Q -> DQ -> MatMul(., DQ(W int8 [3, 4])) -> y, with each rule a knob."""
    inits = [
        numpy_helper.from_array(np.full(act_scale_size, 0.1, np.float32).reshape(() if act_scale_size == 1
                                                                                 else (act_scale_size,)), "xs"),
        numpy_helper.from_array(np.full(() if act_scale_size == 1 else (act_scale_size,), zp_value, zp_dtype), "xz"),
        numpy_helper.from_array(np.ones((3, 4), np.int8), "w"),
        numpy_helper.from_array(np.full(weight_scale_size, 0.05, np.float32).reshape(
            () if weight_scale_size == 1 else (weight_scale_size,)), "ws"),
        numpy_helper.from_array(np.zeros(() if weight_scale_size == 1 else (weight_scale_size,), np.int8), "wz"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=weight_axis),
             helper.make_node("MatMul", ["xq" if q_feeds_matmul else "xd", "wd"], ["y"], name="mm")]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, [2, 3])], [_vi("y", TensorProto.FLOAT, [2, 4])], inits)


def test_valid_qdq_graph_passes():
    assert check_qdq(_qdq_matmul()) == []


def test_asymmetric_uint8_fails():
    found = check_qdq(_qdq_matmul(zp_dtype=np.uint8, zp_value=128))
    assert found and all("uint8" in v.message or "int8" in v.message for v in found)
    assert {v.node for v in found} == {"q", "dq"}


def test_nonzero_int8_zero_point_fails():
    found = check_qdq(_qdq_matmul(zp_value=3))
    assert found and all("symmetric" in v.message for v in found)


def test_weight_per_channel_on_the_input_axis_fails():
    found = check_qdq(_qdq_matmul(weight_axis=0, weight_scale_size=3))
    assert [v.node for v in found] == ["wdq"] and "output-channel axis 1" in found[0].message


def test_per_tensor_weight_fails_when_per_channel_is_required():
    assert [v.node for v in check_qdq(_qdq_matmul(weight_scale_size=1))] == ["wdq"]
    assert check_qdq(_qdq_matmul(weight_scale_size=1), require_per_channel_weights=False) == []


def test_per_channel_activation_fails():
    found = check_qdq(_qdq_matmul(act_scale_size=3))
    assert found and all("per-tensor" in v.message for v in found)


def test_quantize_not_followed_by_dequantize_fails():
    found = check_qdq(_qdq_matmul(q_feeds_matmul=True))
    assert any(v.node == "q" and "followed by DequantizeLinear" in v.message for v in found)


# -- profiles ----------------------------------------------------------------------------
def test_runtime_feed_shapes_cover_the_decode_range(tiny_bundle):
    bundle = Bundle.load(tiny_bundle[0])
    ctx = bundle.config["model"]["text"]["context_length"]
    shapes = runtime_feed_shapes(bundle, max_batch=3, num_beams=2)
    decoder = shapes["decoder"]
    assert {f["past_text_k_0"][2] for f in decoder} == set(range(ctx - 1))  # past 0 .. ctx-2 (ctx-1 new tokens)
    assert max(f["input_ids"][0] for f in decoder) == 6  # 3 images x 2 beams
    assert max(f["input_ids"][1] for f in decoder) == ctx  # prefill
    assert {f["input_ids"] for f in shapes["text_encoder"]} == {(3, ctx)}
    assert {f["pixel_values"][0] for f in shapes["image_encoder"]} == {3}


def test_profiles_that_miss_runtime_shapes_fail(tiny_bundle):
    bundle = Bundle.load(tiny_bundle[0])
    config = ProfileConfig(max_batch=3, num_beams=2)
    shapes = runtime_feed_shapes(bundle, config.max_batch, config.num_beams)
    good = derive_profiles(bundle, config)["decoder"]
    assert check_profiles("decoder", good, shapes["decoder"]) == []
    (profile,) = good
    short = {n: (lo, opt, tuple(h - 5 if d == 2 and n.startswith("past") else h for d, h in enumerate(hi)))
             for n, (lo, opt, hi) in profile.items()}  # past max 5 below the context
    narrow = derive_profiles(bundle, ProfileConfig(max_batch=3, num_beams=1))["decoder"]  # no room for beams
    no_empty = {n: (tuple(1 if n.startswith("past") and d == 2 else v for d, v in enumerate(lo)), opt, hi)
                for n, (lo, opt, hi) in profile.items()}  # first step (past 0) not allowed
    for bad, what in ((short, "past_text"), (narrow, "input_ids"), (no_empty, "past_text")):
        found = check_profiles("decoder", bad if isinstance(bad, list) else [bad], shapes["decoder"])
        assert found and what in found[0].message


def test_derive_profiles_follow_the_manifest_axes(tiny_bundle):
    bundle = Bundle.load(tiny_bundle[0])
    ctx = bundle.config["model"]["text"]["context_length"]
    profiles = derive_profiles(bundle, ProfileConfig(max_batch=4, opt_batch=2, num_beams=3))
    (dec,) = profiles["decoder"]
    lo, opt, hi = dec["past_text_k_0"]
    assert (lo[0], lo[2]) == (1, 0) and (hi[0], hi[2]) == (12, ctx - 1) and opt[0] == 2
    assert dec["input_ids"] == ((1, 1), (2, 1), (12, ctx))
    assert profiles["text_encoder"][0]["input_ids"] == ((1, 1), (2, ctx), (4, ctx))
    assert profiles["image_encoder"][0]["pixel_values"][2][0] == 4


def test_derive_profiles_rejects_unknown_axes(tiny_bundle):
    bundle = Bundle.load(tiny_bundle[0])
    bundle.manifest["graphs"]["cross_kv"]["inputs"][0]["shape"][1] = "tokens"
    with pytest.raises(ValueError, match="symbolic axis 'tokens'"):
        derive_profiles(bundle)


def test_profile_config_validates():
    with pytest.raises(ValueError, match="opt_batch"):
        ProfileConfig(max_batch=2, opt_batch=4)
    with pytest.raises(ValueError, match="num_beams"):
        ProfileConfig(num_beams=0)


@pytest.fixture(scope="module")
def b32_bundles(tmp_path_factory):
    import torch

    from coca_edge.exporters.bundle import export_bundle
    from coca_edge.models import CoCa, get_preset
    from coca_edge.quantize import preset_plan, quantize
    from tests.unit.trt_bundles import derive_bundle

    root = tmp_path_factory.mktemp("b32")
    torch.manual_seed(0)
    fp32 = export_bundle(CoCa(get_preset("coca_ViT-B-32")).eval(), root / "fp32", validate=False, progress=False)
    return {"fp32": fp32,
            "fp16-preset": quantize(fp32, preset_plan("tensorrt", "fp16"), root / "fp16", progress=False),
            "int8-ort": derive_bundle(fp32, root / "int8-ort"),
            "int8-preset": quantize(fp32, preset_plan("tensorrt", "int8"), root / "int8", progress=False,
                                    calib="synthetic-scenes:train", calib_samples=8)}


@pytest.mark.heavy
@pytest.mark.parametrize("variant", VARIANTS)
def test_vit_b32_bundles_pass_every_check(variant, b32_bundles):
    """coca_ViT-B-32 (random weights): FP32, FP16 and INT8 pass the ops, Q/DQ and profile checks."""
    bundle = Bundle.load(b32_bundles[variant], verify_hashes=False)
    config = ProfileConfig(max_batch=8, num_beams=3)
    found = check_bundle(bundle, derive_profiles(bundle, config), config.max_batch, config.num_beams,
                         qdq=variant.startswith("int8"))
    assert {g: [str(v) for v in vs] for g, vs in found.items()} == {g: [] for g in found}
