"""Per-target plans: preset x precision x method -> ``{graph: config}``.

Why each choice (numbers in docs/quantization.md):

- ``cpu`` (x86 ORT): INT8 defaults to dynamic everywhere: on the coca_ViT-B-32 image
  encoder it measured fastest and closest to FP32 (17 ms, cosine 0.9997 vs static QDQ's
  17.5 ms / 0.9994, FP32 35 ms) and the decode step drops 16.4 -> 7.2 ms. ``--method static``
  gives u8s8 QDQ with Percentile ranges on MatMul/Gemm (+ the token-embedding Gather, a
  quarter of the text graphs' bytes), per-channel weights: s8s8 MinMax lost accuracy
  (cosine 0.995) and quantizing the patch Conv bought nothing.
  INT4 is block-wise weight-only (MatMulNBits, block 32, int8 compute) on the two
  memory-bound graphs (decoder, text encoder), dynamic INT8 on the other two. The decoder's
  attention blocks then become ORT's contrib ``MultiHeadAttention`` (``fuse_attention``): the
  coca_ViT-B-32 INT8 decode step 8.95 -> 8.27 ms at batch 1, 23.6 -> 21.0 ms at batch 8.
- ``arm64`` (ARM CPU / Jetson ORT): ORT's ARM kernels take u8 activations with s8 weights
  (its docs: U8S8 at least as fast as U8U8 there, S8S8 QDQ is converted to it), so
  static u8s8 per-channel is the default; INT4 as on ``cpu``.
- ``tensorrt``: TensorRT runs explicit QDQ INT8 only with symmetric s8 scales and zero
  points 0 (s8s8), per-channel weights on the output-channel axis (the last axis of a
  MatMul weight, also for the batched cross K/V projection), Q/DQ on the inputs of MatMul/Gemm/Conv where it fuses them,
  a dedicated Q/DQ pair per consumer. It has no dynamic quantization and no MatMulNBits:
  INT4 is written as blocked ``DequantizeLinear -> MatMul``.
- ``gpu-fp16``: FP16 weights and compute; only the logits stay FP32 (ORT's CUDA
  LayerNorm and Softmax kernels accumulate in FP32 already, so blocking them would only
  add casts).
"""
from __future__ import annotations

import dataclasses

from typing import Callable

from .config import Fp16Config, Int8DynamicConfig, Int8StaticConfig, QuantizeError, WeightOnlyConfig

__all__ = ["PRESETS", "PRECISIONS", "METHODS", "preset_plan"]

GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")
PRECISIONS = ("fp16", "int8", "int4")
METHODS = ("dynamic", "static", "weight-only")

_CPU_STATIC = Int8StaticConfig(method="percentile", activation_type="uint8", weight_type="int8",
                               op_types=("MatMul", "Gemm", "Gather"), per_channel=True)
_TRT_STATIC = Int8StaticConfig(method="percentile", activation_type="int8", weight_type="int8",
                               symmetric_activations=True, symmetric_weights=True, per_channel=True,
                               op_types=("MatMul", "Gemm", "Conv"), channel_axis=-1, dedicated_qdq_pair=True)
_INT4 = WeightOnlyConfig(bits=4, block_size=32, accuracy_level=4)
# The cpu preset's decoder: attention as ORT's MultiHeadAttention after quantizing (fusion.py).
_CPU_DECODER_INT8 = Int8DynamicConfig(fuse_attention=True)
_CPU_DECODER_INT4 = WeightOnlyConfig(bits=4, block_size=32, accuracy_level=4, fuse_attention=True)
# 8-bit blocks for MatMul weights only: ORT packs no 8-bit Gather (GatherBlockQuantized is 4-bit).
_INT8_WO = WeightOnlyConfig(bits=8, block_size=32, accuracy_level=4, op_types=("MatMul",))
_MEMORY_BOUND = ("text_encoder", "decoder")


def _all(config) -> dict:
    return {g: config for g in GRAPHS}


def _int4(rest, decoder=_INT4) -> dict:
    return {g: (decoder if g == "decoder" else _INT4 if g in _MEMORY_BOUND else rest) for g in GRAPHS}


def _cpu_dynamic() -> dict:
    return {g: (_CPU_DECODER_INT8 if g == "decoder" else Int8DynamicConfig()) for g in GRAPHS}


def _int8_weight_only() -> dict:
    return {g: (_INT8_WO if g in _MEMORY_BOUND else Int8DynamicConfig()) for g in GRAPHS}


# preset -> precision -> method (None: the preset's default) -> plan factory
PRESETS: dict[str, dict[str, dict[str | None, Callable[[], dict]]]] = {
    "cpu": {
        "fp16": {None: lambda: _all(Fp16Config())},
        "int8": {None: _cpu_dynamic, "dynamic": _cpu_dynamic,
                 "static": lambda: _all(_CPU_STATIC), "weight-only": _int8_weight_only},
        "int4": {None: lambda: _int4(Int8DynamicConfig(), _CPU_DECODER_INT4),
                 "dynamic": lambda: _int4(Int8DynamicConfig(), _CPU_DECODER_INT4),
                 "static": lambda: _int4(_CPU_STATIC, _CPU_DECODER_INT4)},
    },
    "arm64": {
        "fp16": {None: lambda: _all(Fp16Config())},
        "int8": {None: lambda: _all(_CPU_STATIC), "static": lambda: _all(_CPU_STATIC),
                 "dynamic": lambda: _all(Int8DynamicConfig()), "weight-only": _int8_weight_only},
        "int4": {None: lambda: _int4(_CPU_STATIC), "static": lambda: _int4(_CPU_STATIC),
                 "dynamic": lambda: _int4(Int8DynamicConfig())},
    },
    "tensorrt": {
        "fp16": {None: lambda: _all(Fp16Config())},
        "int8": {None: lambda: _all(_TRT_STATIC), "static": lambda: _all(_TRT_STATIC)},
        "int4": {None: lambda: {g: (WeightOnlyConfig(bits=4, block_size=32, accuracy_level=0, format="qdq",
                                                     op_types=("MatMul",))
                                    if g in _MEMORY_BOUND else _TRT_STATIC) for g in GRAPHS}},
    },
    "gpu-fp16": {
        "fp16": {None: lambda: _all(Fp16Config(block_ops=()))},
    },
}


def preset_plan(preset: str, precision: str, method: str | None = None,
                fuse_attention: bool | None = None) -> dict:
    """The ``{graph: config}`` plan of a preset for a precision (and INT8 method).

    ``fuse_attention`` (None: the preset's choice) turns the decoder's attention fusion on or off;
    on is refused for a decoder method that cannot fuse (FP16, static QDQ, QDQ weight-only)."""
    if preset not in PRESETS:
        raise QuantizeError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if precision not in PRECISIONS:
        raise QuantizeError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    by_precision = PRESETS[preset]
    if precision not in by_precision:
        raise QuantizeError(f"preset {preset} has no {precision} (it offers: {', '.join(by_precision)})")
    methods = by_precision[precision]
    if method not in methods:
        offered = [m for m in methods if m] or ["none: this precision has no method choice"]
        raise QuantizeError(f"preset {preset} has no {method} method for {precision} (offers: {', '.join(offered)})")
    plan = methods[method]()
    if fuse_attention is None:
        return plan
    decoder = plan["decoder"]
    if not hasattr(decoder, "fuse_attention") or (fuse_attention and getattr(decoder, "format", "") == "qdq"):
        if fuse_attention:
            raise QuantizeError(f"fuse_attention: preset {preset} {precision} quantizes the decoder with "
                                f"{type(decoder).__name__}{' (QDQ)' if hasattr(decoder, 'format') else ''}, which "
                                "cannot fuse attention (dynamic INT8 and MatMulNBits weight-only decoders can)")
        return plan
    return {**plan, "decoder": dataclasses.replace(decoder, fuse_attention=fuse_attention)}
