"""A TensorRT-style INT8 variant of a bundle made directly with ONNX Runtime's ``quantize_static``
(imported explicitly: ``from tests.unit.trt_bundles import ...``).

Static QDQ, int8 activations and weights, symmetric, per-channel weights on the output-channel
(last) axis of every MatMul, only MatMul/Gemm/Conv quantized: what TensorRT's explicit
quantization needs. It is the known-good INT8 input for the structural checks, beside the
bundles ``coca_edge.quantize``'s ``tensorrt`` preset makes (tests/conftest.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from coca_edge.runtime.bundle import Bundle, write_manifest


def _feeds(bundle: Bundle, name: str, seed: int) -> dict[str, np.ndarray]:
    """Random calibration feed for a graph: batch 2, text length = context, past 3."""
    rng = np.random.default_rng(seed)
    ctx = bundle.config["model"]["text"]["context_length"]
    dims = {"batch": 2, "text_len": ctx, "seq": 1, "past": 3}
    feed = {}
    for spec in bundle.graph_io(name)[0]:
        shape = [dims[d] if isinstance(d, str) else d for d in spec["shape"]]
        if spec["dtype"] == "int64":
            feed[spec["name"]] = rng.integers(1, 1000, shape).astype(np.int64)
        else:
            feed[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _int8_qdq(src: Path, dst: Path, bundle: Bundle, name: str, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([_feeds(bundle, name, seed) for seed in range(2)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   # ORT's default MatMul channel axis is 1, which for the batched
                                   # cross_kv weight [L, 2, 1, H, W+1, D] is not the output channel
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1}})


def derive_bundle(src: str | Path, dst: str | Path, excluded: dict[str, list[str]] | None = None) -> Path:
    """Copy bundle ``src`` to ``dst`` with every graph quantized, re-hashed; ``excluded`` lists nodes per
    graph kept in FP32 (recorded in the manifest like ``coca_edge.quantize`` does)."""
    src, dst = Path(src), Path(dst)
    bundle = Bundle.load(src)
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    graphs = json.loads((src / "manifest.json").read_text())["graphs"]
    for name, graph in graphs.items():
        path = dst / graph["file"]
        tmp = path.with_suffix(".tmp.onnx")
        _int8_qdq(src / graph["file"], tmp, bundle, name, (excluded or {}).get(name, []))
        tmp.replace(path)
        graph["precision"] = "int8-static"
        graph["quantization"] = {"method": "ort-quantize-static-qdq", "excluded_nodes": (excluded or {}).get(name, [])}
    write_manifest(dst, graphs, {"derived_from": str(src), "precision": "int8-static"}, "test",
                   extra={"fused_cross_kv": False})
    return dst
