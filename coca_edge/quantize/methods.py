"""One function per config type, registered against that type (no if/elif on strings).

Each takes the FP32 graph file, writes the quantized graph file and returns what the
manifest records about it. ONNX Runtime's own tools do the work:
``quantize_dynamic`` / ``quantize_static`` (QDQ), ``MatMulNBitsQuantizer`` and
``onnxruntime.transformers.float16``.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import (
    Fp16Config,
    Fp32Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeError,
    WeightOnlyConfig,
)

__all__ = ["register", "method_for", "GraphJob", "count_ops"]

_REGISTRY: dict[type, Callable[["GraphJob"], dict[str, Any]]] = {}


def register(config_type: type) -> Callable:
    def wrap(fn: Callable[["GraphJob"], dict[str, Any]]) -> Callable:
        _REGISTRY[config_type] = fn
        return fn
    return wrap


def method_for(config: Any) -> Callable[["GraphJob"], dict[str, Any]]:
    try:
        return _REGISTRY[type(config)]
    except KeyError:
        raise QuantizeError(f"no quantization method for {type(config).__name__} "
                            f"(known: {', '.join(t.__name__ for t in _REGISTRY)})") from None


@dataclass
class GraphJob:
    """One graph to quantize: its FP32 file, where to write, the config and calibration."""

    graph: str
    source: Path
    target: Path
    config: Any
    model_sha256: str
    calibration: Any = None  # coca_edge.calibration.CalibrationSet, for static configs
    cache_dir: Path | None = None
    data_files: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet():
    """ORT's quantizers log every skipped tensor at INFO/WARNING through the root logger and
    print calibration chatter to stdout (which would corrupt ``--json`` output)."""
    import io

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def count_ops(path: str | Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def _check_nodes(job: GraphJob, nodes: tuple[str, ...]) -> None:
    """Excluded nodes must exist: a typo would otherwise silently quantize the node."""
    if not nodes:
        return
    import onnx

    names = {n.name for n in onnx.load(str(job.source), load_external_data=False).graph.node}
    missing = [n for n in nodes if n not in names]
    if missing:
        raise QuantizeError(f"{job.graph}: exclude_nodes {missing} are not nodes of {job.source.name}")


@register(Fp32Config)
def _keep(job: GraphJob) -> dict[str, Any]:
    shutil.copyfile(job.source, job.target)
    for name in job.data_files:  # external weights (graphs over 2 GB) keep their file names
        shutil.copyfile(job.source.parent / name, job.target.parent / name)
    return {"data_files": list(job.data_files)}


@register(Int8DynamicConfig)
def _dynamic(job: GraphJob) -> dict[str, Any]:
    from onnxruntime.quantization import quantize_dynamic

    cfg: Int8DynamicConfig = job.config
    _check_nodes(job, cfg.exclude_nodes)
    excluded = _excluded(job, cfg)
    with _quiet():
        quantize_dynamic(job.source, job.target, weight_type=_qtype(cfg.weight_type), per_channel=cfg.per_channel,
                         reduce_range=cfg.reduce_range, op_types_to_quantize=list(cfg.op_types),
                         nodes_to_exclude=excluded)
    head = [n for n in excluded if n not in cfg.exclude_nodes]  # what keep_logits added
    info: dict[str, Any] = {"kept_fp32": excluded}
    if cfg.keep_logits and cfg.logits_block_bits and head:
        _pack_blocks(job.target, head, cfg.logits_block_bits)
        info = {"kept_fp32": [n for n in excluded if n not in head], "logits_block_bits": cfg.logits_block_bits,
                "block_packed": head}
    return {**info, **_fused(job, cfg)}


def _fused(job: GraphJob, cfg: Any) -> dict[str, Any]:
    """With ``fuse_attention``: the written graph's attention blocks as ORT MultiHeadAttention."""
    if not cfg.fuse_attention:
        return {}
    from .fusion import fuse_attention

    try:
        return {"fused_attention": fuse_attention(job.target)}
    except QuantizeError as err:
        raise QuantizeError(f"{job.graph}: {err}") from None


def _pack_blocks(path: Path, nodes: list[str], bits: int, block_size: int = 32) -> None:
    """Store the weights of exactly ``nodes`` (MatMuls with a constant weight) of the graph at
    ``path`` as ``bits``-bit blocks (``MatMulNBits``, int8 compute); every other node is untouched."""
    import onnx

    others = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node
              if n.op_type == "MatMul" and n.name not in nodes]
    _matmul_nbits(path, path, others, bits=bits, block_size=block_size, symmetric=True, accuracy_level=4)


def _excluded(job: GraphJob, cfg: Any) -> list[str]:
    """The configured exclusions plus, with ``keep_logits``, the op producing the decoder's logits."""
    excluded = list(cfg.exclude_nodes)
    if cfg.keep_logits:
        import onnx

        head = _producers(onnx.load(str(job.source), load_external_data=False), "logits")
        excluded += [n for n in head if n not in excluded]
    return excluded


@register(Int8StaticConfig)
def _static(job: GraphJob) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from coca_edge.calibration import FeedReader, range_cache_key, range_cache_path, store_ranges

    cfg: Int8StaticConfig = job.config
    _check_nodes(job, cfg.exclude_nodes)
    if job.calibration is None:
        raise QuantizeError(f"{job.graph}: static INT8 needs calibration data (pass calib=..., or --calib on the CLI)")
    extra: dict[str, Any] = {"ActivationSymmetric": cfg.symmetric_activations,
                             "WeightSymmetric": cfg.symmetric_weights,
                             "DedicatedQDQPair": cfg.dedicated_qdq_pair}
    calib_options: dict[str, Any] = {"CalibTensorRangeSymmetric": cfg.symmetric_activations}
    if cfg.method == "percentile":
        calib_options["CalibPercentile"] = cfg.percentile
    if cfg.channel_axis is not None:
        extra["QDQOpTypePerChannelSupportToAxis"] = {"MatMul": cfg.channel_axis}
    extra.update(calib_options)
    # One feed per collection pass: decoder feeds differ in shape (past length, live rows),
    # which ORT's histogram collectors cannot stack, and intermediate outputs of the whole
    # set would not fit in memory on coca_ViT-B-32. Ranges and histograms merge across passes.
    extra["CalibStridedMinMax"] = 1
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.method]
    # Ranges depend on the tensors collected (op types) and how they are reduced, not on
    # weight types or excluded nodes: a fallback step reuses the ranges of the base run.
    key = range_cache_key(job.graph, job.model_sha256, job.calibration.key(),
                          {"method": cfg.method, "op_types": sorted(cfg.op_types), **calib_options})
    cached = range_cache_path(job.cache_dir, job.graph, key)
    hit = cached.is_file()
    with tempfile.TemporaryDirectory(prefix="coca-edge-calib-") as tmp:
        written = Path(tmp) / "ranges.json"
        reader = None if hit else FeedReader(job.calibration.feeds(job.graph))
        if reader is not None and len(reader) == 0:
            raise QuantizeError(f"{job.graph}: calibration produced no feeds")
        with _quiet():
            quantize_static(job.source, job.target, reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(cfg.op_types), per_channel=cfg.per_channel,
                            activation_type=_qtype(cfg.activation_type), weight_type=_qtype(cfg.weight_type),
                            nodes_to_exclude=_excluded(job, cfg), calibrate_method=method,
                            extra_options=extra, calibration_cache_path=cached if hit else written)
        if not hit:
            store_ranges(written, cached)
    return {"calibration": {"key": key, "data": job.calibration.key(), "cache": "hit" if hit else "miss",
                            "feeds": None if hit else len(reader)}}


@register(WeightOnlyConfig)
def _weight_only(job: GraphJob) -> dict[str, Any]:
    cfg: WeightOnlyConfig = job.config
    _check_nodes(job, cfg.exclude_nodes)
    _matmul_nbits(job.source, job.target, list(cfg.exclude_nodes), bits=cfg.bits, block_size=cfg.block_size,
                  symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level, qdq=cfg.format == "qdq",
                  op_types=cfg.op_types)
    return _fused(job, cfg)


def _matmul_nbits(source: Path, target: Path, exclude: list[str], *, bits: int, block_size: int, symmetric: bool,
                  accuracy_level: int, qdq: bool = False, op_types: tuple[str, ...] = ("MatMul",)) -> None:
    """ORT's block-wise weight-only quantizer over ``source``, every node but ``exclude``."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator, bits=bits,
                                        op_types_to_quantize=op_types)
    model = onnx.load(str(source))
    with _quiet():
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=algo)
        quantizer.process()
    quantizer.model.save_model_to_file(str(target), False)


@register(Fp16Config)
def _fp16(job: GraphJob) -> dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    cfg: Fp16Config = job.config
    _check_nodes(job, cfg.exclude_nodes)
    model = onnx.load(str(job.source))
    blocked = list(cfg.exclude_nodes)
    if cfg.block_logits:
        blocked += [n for n in _producers(model, "logits") if n not in blocked]
    with _quiet():
        half = convert_float_to_float16(model, keep_io_types=cfg.keep_io_types, op_block_list=list(cfg.block_ops),
                                        node_block_list=blocked)
    onnx.save(half, str(job.target))
    return {"blocked_nodes": blocked}


def _producers(model: Any, output: str) -> list[str]:
    """The MatMul/Gemm computing graph output ``output`` and the elementwise ops after it
    (for a vocabulary-pruned model also the Pad + Gather that spread its columns over the
    whole vocabulary: the pad value is far outside any calibrated range)."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    if output not in {o.name for o in model.graph.output}:
        return []
    names, tensor = [], output
    while tensor in by_output:
        node = by_output[tensor]
        names.append(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            return names
        if node.op_type not in ("Add", "Reshape", "Cast", "Identity", "Mul", "Gather", "Pad", "Concat"):
            return []
        tensor = node.input[0]
    return []
