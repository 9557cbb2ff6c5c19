"""Quantization configs: one frozen dataclass per method; the config TYPE selects the method.

A bundle is quantized with one config for every graph, or with a plan ``{graph: config}``
(what the presets in ``presets.py`` produce). Configs round-trip through ``to_dict`` /
``config_from_dict`` so the manifest records exactly what was run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Union

__all__ = ["QuantizeError", "Fp32Config", "Fp16Config", "Int8DynamicConfig", "Int8StaticConfig", "WeightOnlyConfig",
           "AutoFallbackConfig", "GraphConfig", "config_from_dict", "CALIBRATION_METHODS", "INT_TYPES"]

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT_TYPES = ("int8", "uint8")
# Ops whose weights ORT's quantizers handle on these graphs. Gather is the token embedding:
# quantizing it takes 100 MB off the coca_ViT-B-32 decoder and text encoder each.
_QUANT_OPS = ("MatMul", "Gemm", "Conv", "Gather")


class QuantizeError(ValueError):
    """Bad quantization input: config, bundle (e.g. already quantized), preset or output path."""


def _tuple_of_str(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise QuantizeError(f"{type(obj).__name__}.{name} must be a list of strings, got {value!r}")
    object.__setattr__(obj, name, tuple(value))


def _choice(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(obj, name) not in allowed:
        raise QuantizeError(f"{type(obj).__name__}.{name} must be one of {', '.join(allowed)}, "
                            f"got {getattr(obj, name)!r}")


def _flag(obj: Any, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise QuantizeError(f"{type(obj).__name__}.{name} must be true or false, got {getattr(obj, name)!r}")


class _Config:
    kind = ""  # manifest name of the method
    precision = ""  # manifest precision of a graph it produced

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                                for k, v in asdict(self).items()}}

    def with_excluded(self, nodes: tuple[str, ...]) -> "_Config":
        """The same config with ``nodes`` kept at higher precision (the fallback's lever)."""
        from dataclasses import replace

        return replace(self, exclude_nodes=tuple(dict.fromkeys((*self.exclude_nodes, *nodes))))

    @property
    def needs_calibration(self) -> bool:
        return False


@dataclass(frozen=True)
class Fp32Config(_Config):
    """Keep the graph as exported (a plan entry for graphs a target should not quantize)."""

    exclude_nodes: tuple[str, ...] = ()
    kind = "none"
    precision = "fp32"

    def __post_init__(self) -> None:
        _tuple_of_str(self, "exclude_nodes")


@dataclass(frozen=True)
class Fp16Config(_Config):
    """Weights and compute in FP16. ``block_ops`` / ``exclude_nodes`` stay FP32 (numerically
    sensitive: LayerNorm statistics, Softmax sums); ``block_logits`` keeps the op that produces
    the decoder's logits FP32 (argmax ties over a 49k vocabulary); ``keep_io_types`` keeps FP32
    graph inputs/outputs, which ``EdgeCoCa`` feeds and reads unchanged."""

    block_ops: tuple[str, ...] = ("LayerNormalization", "Softmax")
    exclude_nodes: tuple[str, ...] = ()
    block_logits: bool = True
    keep_io_types: bool = True
    kind = "fp16"
    precision = "fp16"

    def __post_init__(self) -> None:
        _tuple_of_str(self, "block_ops")
        _tuple_of_str(self, "exclude_nodes")


@dataclass(frozen=True)
class Int8DynamicConfig(_Config):
    """INT8 weights, activations quantized per run from their live range (no calibration)."""

    weight_type: str = "int8"
    # Per-channel is worse here, not better: ORT's dynamic path then emits plain MatMulInteger
    # nodes, and on the demo student's image encoder (batch 8, ORT 1.32) the embedding cosine
    # fell from 0.99998 to 0.9958 and greedy captions identical to FP32 from 95% to 47-51%.
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    exclude_nodes: tuple[str, ...] = ()
    # The decoder's vocabulary head stays FP32: quantizing it flips near-tied argmaxes, and the
    # first flipped token changes the whole greedy caption. Measured on the demo student (test
    # split, 200 scenes): caption exact-match vs FP32 0.775 with it in INT8, and the fallback
    # only recovered after returning all 107 quantized nodes, the head ranking last by SQNR.
    keep_logits: bool = True
    # ... and is then stored as 8-bit blocks of 32 weights with a scale each (MatMulNBits, int8
    # compute per block) instead of FP32: a quarter of its bytes, and per-block scales keep the
    # near-ties that one per-tensor INT8 scale flips. 0 leaves the head FP32. The head is a quarter
    # of the coca_ViT-B-32 decoder's bytes, streamed every step (docs/quantization.md).
    logits_block_bits: int = 8
    # Rewrite the decoder's attention blocks into ORT's contrib MultiHeadAttention afterwards
    # (quantize/fusion.py): 1.06-1.15x on the coca_ViT-B-32 INT8 decode step. ORT only (measured
    # on CPU), so the cpu preset sets it on the decoder; TensorRT plans never do.
    fuse_attention: bool = False
    kind = "dynamic"
    precision = "int8-dynamic"

    def __post_init__(self) -> None:
        _choice(self, "weight_type", INT_TYPES)
        _flag(self, "fuse_attention")
        if self.logits_block_bits not in (0, 4, 8):
            raise QuantizeError(f"Int8DynamicConfig.logits_block_bits must be 0 (FP32), 4 or 8, "
                                f"got {self.logits_block_bits!r}")
        _tuple_of_str(self, "op_types")
        _tuple_of_str(self, "exclude_nodes")
        unknown = set(self.op_types) - set(_QUANT_OPS)
        if unknown:
            raise QuantizeError(f"Int8DynamicConfig.op_types: unsupported {sorted(unknown)} (use {_QUANT_OPS})")


@dataclass(frozen=True)
class Int8StaticConfig(_Config):
    """Static QDQ INT8 with calibrated activation ranges.

    ``channel_axis`` sets the per-channel axis for MatMul weights: -1 is the output channel
    for weights of any rank (``[in, out]`` and the batched ``[L, 2, 1, H, W+1, D]`` cross K/V
    projection alike), what TensorRT expects; None keeps ORT's default (axis 1, right only
    for 2-D weights).
    """

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    exclude_nodes: tuple[str, ...] = ()
    percentile: float = 99.999
    channel_axis: int | None = None
    dedicated_qdq_pair: bool = False
    keep_logits: bool = True  # the decoder's vocabulary head stays FP32 (see Int8DynamicConfig)
    kind = "static"
    precision = "int8-static"

    def __post_init__(self) -> None:
        _choice(self, "method", CALIBRATION_METHODS)
        _choice(self, "activation_type", INT_TYPES)
        _choice(self, "weight_type", INT_TYPES)
        _tuple_of_str(self, "op_types")
        _tuple_of_str(self, "exclude_nodes")
        unknown = set(self.op_types) - set(_QUANT_OPS)
        if unknown:
            raise QuantizeError(f"Int8StaticConfig.op_types: unsupported {sorted(unknown)} (use {_QUANT_OPS})")
        if not 0 < self.percentile <= 100:
            raise QuantizeError(f"Int8StaticConfig.percentile must be in (0, 100], got {self.percentile}")
        if self.channel_axis not in (None, -1, 0, 1):
            raise QuantizeError(f"Int8StaticConfig.channel_axis must be None, -1, 0 or 1, got {self.channel_axis!r}")

    @property
    def needs_calibration(self) -> bool:
        return True


@dataclass(frozen=True)
class WeightOnlyConfig(_Config):
    """Block-wise weight-only quantization of MatMul weights (ORT ``MatMulNBits``): weights
    stored in ``bits`` with one scale per ``block_size`` inputs; ``accuracy_level`` 4 computes
    with int8 activations on CPU (fastest), 0/1 in FP32. ``Gather`` in ``op_types`` packs the
    token-embedding table too (``GatherBlockQuantized``; a quarter of the coca_ViT-B-32 text
    graphs' bytes). ``format="qdq"`` writes blocked ``DequantizeLinear -> MatMul`` instead (for
    TensorRT, which has neither contrib op)."""

    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = True
    format: str = "matmulnbits"
    op_types: tuple[str, ...] = ("MatMul", "Gather")
    exclude_nodes: tuple[str, ...] = ()
    fuse_attention: bool = False  # as Int8DynamicConfig.fuse_attention (format "matmulnbits" only)
    kind = "weight-only"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizeError(f"WeightOnlyConfig.bits must be 4 or 8, got {self.bits!r}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise QuantizeError(f"WeightOnlyConfig.block_size must be a power of two >= 16, got {self.block_size!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QuantizeError(f"WeightOnlyConfig.accuracy_level must be 0..4, got {self.accuracy_level!r}")
        _choice(self, "format", ("matmulnbits", "qdq"))
        _flag(self, "fuse_attention")
        if self.fuse_attention and self.format == "qdq":
            raise QuantizeError("WeightOnlyConfig.fuse_attention writes ORT contrib ops; format='qdq' is for "
                                "TensorRT, which cannot run them")
        _tuple_of_str(self, "op_types")
        _tuple_of_str(self, "exclude_nodes")
        unknown = set(self.op_types) - {"MatMul", "Gather"}
        if unknown or "MatMul" not in self.op_types:
            raise QuantizeError(f"WeightOnlyConfig.op_types must hold MatMul and may add Gather, got {self.op_types}")

    @property
    def precision(self) -> str:  # type: ignore[override]
        return f"int{self.bits}-weight-only"


GraphConfig = Union[Fp32Config, Fp16Config, Int8DynamicConfig, Int8StaticConfig, WeightOnlyConfig]
_GRAPH_CONFIGS = {c.__name__: c for c in (Fp32Config, Fp16Config, Int8DynamicConfig, Int8StaticConfig,
                                          WeightOnlyConfig)}


@dataclass(frozen=True)
class AutoFallbackConfig:
    """Quantize with ``base`` (one config or a plan), then return the fewest nodes to their
    FP32 precision needed for the candidate to pass ``gates`` on ``eval_data``.

    Nodes are ranked by the drift each adds (validation's ``localize``, the ``top_k`` worst
    over all graphs); at most ``max_nodes`` fall back. ``gates`` is a gates file or a named gate set.
    """

    base: Any
    gates: str
    eval_data: str = "synthetic-scenes:val"
    eval_samples: int = 64
    max_nodes: int = 32
    top_k: int = 512

    def __post_init__(self) -> None:
        plan = self.base.values() if isinstance(self.base, Mapping) else [self.base]
        for cfg in plan:
            if not isinstance(cfg, tuple(_GRAPH_CONFIGS.values())):
                raise QuantizeError(f"AutoFallbackConfig.base must be a graph config or a {{graph: config}} plan, "
                                    f"got {type(cfg).__name__}")
        if not self.gates:
            raise QuantizeError("AutoFallbackConfig.gates must name a gates file or gate set")
        for name in ("eval_samples", "max_nodes", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise QuantizeError(f"AutoFallbackConfig.{name} must be an integer >= 1, got {value!r}")


def config_from_dict(data: Mapping[str, Any]) -> GraphConfig:
    """Inverse of ``to_dict`` (unknown types and keys are errors)."""
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in _GRAPH_CONFIGS:
        raise QuantizeError(f"unknown config type {kind!r} (known: {', '.join(_GRAPH_CONFIGS)})")
    cls = _GRAPH_CONFIGS[kind]
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise QuantizeError(f"{kind}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
