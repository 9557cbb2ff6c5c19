"""Structural checks that an ONNX graph will build with TensorRT, run without TensorRT.

Three checks, each returning :class:`Violation` objects (never printing):

- :func:`check_ops`: every node's op, domain, attributes, constant inputs and data type are
  in the support table (``trt_support.json``, transcribed from onnx-tensorrt's
  ``docs/operators.md``; an op missing from the table counts as unsupported).
- :func:`check_qdq`: Q/DQ placement follows TensorRT's explicit-quantization rules: int8,
  zero points 0 (symmetric), constant scales, per-tensor activations, weights per-channel on
  the consuming op's output-channel axis, every QuantizeLinear feeding DequantizeLinear.
- :func:`check_profiles`: optimization profiles contain every shape the runtime feeds
  (:func:`runtime_feed_shapes` records those by running ``EdgeCoCa`` on shape-only runners).

These are necessary conditions, not a build: the parser on the device stays the authority.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = ["Violation", "SupportTable", "load_support_table", "check_ops", "check_qdq", "check_profiles",
           "runtime_feed_shapes", "check_bundle", "SUPPORT_TABLE"]

SUPPORT_TABLE = Path(__file__).with_name("trt_support.json")

# ONNX TensorProto element types -> the names the support table uses
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                11: "float64", 16: "bfloat16"}

# Which input of a consumer holds the weight, and the weight's output-channel axis.
# MatMul B is [K, N] (N = outputs); Gemm B is [K, N], or [N, K] with transB=1; Conv W is [O, I, ...].
_WEIGHT_AXIS = {"MatMul": (1, lambda node, rank: rank - 1), "Conv": (1, lambda node, rank: 0),
                "ConvTranspose": (1, lambda node, rank: 1),
                "Gemm": (1, lambda node, rank: 0 if _attr(node, "transB", 0) else 1)}


@dataclass(frozen=True)
class Violation:
    """One reason a graph would not build (or not quantize) as intended with TensorRT."""

    graph: str
    check: str  # "ops" | "qdq" | "profiles"
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: [{self.check}] {self.node}: {self.message}"


@dataclass(frozen=True)
class SupportTable:
    source: str
    versions: str
    opset_min: int
    opset_max: int
    domains: tuple[str, ...]
    ops: Mapping[str, Mapping[str, Any]]


@lru_cache(maxsize=4)
def load_support_table(path: str | Path = SUPPORT_TABLE) -> SupportTable:
    data = json.loads(Path(path).read_text())
    for key in ("source", "tensorrt_versions", "opset", "domains", "ops"):
        if key not in data:
            raise ValueError(f"{path}: support table is missing {key!r}")
    return SupportTable(data["source"], data["tensorrt_versions"], int(data["opset"]["min"]),
                        int(data["opset"]["max"]), tuple(data["domains"]), data["ops"])


# -- helpers -----------------------------------------------------------------------------
def _attr(node, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _node_name(node, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


class _GraphIndex:
    """Dtypes, constants and consumers of one graph's tensors."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is best-effort; unknown dtypes are reported as unchecked
            inferred = model
        graph = inferred.graph
        self.graph = model.graph
        self.dtypes: dict[str, str] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            t = vi.type.tensor_type
            if t.elem_type:
                self.dtypes[vi.name] = _ONNX_DTYPES.get(t.elem_type, f"onnx-type-{t.elem_type}")
        self.initializers = {i.name: i for i in model.graph.initializer}
        for name, init in self.initializers.items():
            self.dtypes[name] = _ONNX_DTYPES.get(init.data_type, f"onnx-type-{init.data_type}")
        self.constants: dict[str, Any] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                value = _attr(node, "value")
                if value is not None:
                    self.constants[node.output[0]] = value
                    self.dtypes[node.output[0]] = _ONNX_DTYPES.get(value.data_type, "?")
        self._numpy = numpy_helper.to_array
        self.producers = {o: n for n in model.graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in model.graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in model.graph.output}

    def is_constant(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def array(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self._numpy(self.initializers[name])
        if name in self.constants:
            return self._numpy(self.constants[name])
        return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        if name in self.constants:
            return tuple(self.constants[name].dims)
        return None

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.consumers or name in self.graph_outputs)


# -- ops ---------------------------------------------------------------------------------
def check_ops(model, graph: str = "", table: SupportTable | None = None) -> list[Violation]:
    """Ops, domains, attributes, constant inputs and dtypes against the support table."""
    table = table or load_support_table()
    out: list[Violation] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not table.opset_min <= imp.version <= table.opset_max:
            out.append(Violation(graph, "ops", "<model>", f"opset {imp.version} is outside {table.opset_min}.."
                                 f"{table.opset_max} that TensorRT {table.versions} parses"))
    index = _GraphIndex(model)
    for i, node in enumerate(model.graph.node):
        name = _node_name(node, i)
        if node.domain not in table.domains:
            out.append(Violation(graph, "ops", name, f"{node.domain}.{node.op_type}: custom-domain ops need a "
                                 "TensorRT plugin (export without ONNX Runtime-specific fusions)"))
            continue
        spec = table.ops.get(node.op_type)
        if spec is None or not spec.get("supported", False):
            why = spec.get("note", "not supported") if spec else "not in the support table (treated as unsupported)"
            out.append(Violation(graph, "ops", name, f"{node.op_type}: {why}"))
            continue
        out += _check_node(graph, name, node, spec, index)
    return out


def _check_node(graph: str, name: str, node, spec: Mapping[str, Any], index: _GraphIndex) -> list[Violation]:
    out = []
    for attr, allowed in spec.get("attributes", {}).items():
        value = _attr(node, attr)
        if value is not None and value not in allowed:
            out.append(Violation(graph, "ops", name, f"{node.op_type} attribute {attr}={value!r}; TensorRT "
                                 f"supports {allowed}"))
    for k in spec.get("const_inputs", []):
        if k < len(node.input) and node.input[k] and not index.is_constant(node.input[k]):
            out.append(Violation(graph, "ops", name, f"{node.op_type} input {k} ({node.input[k]}) must be a "
                                 "build-time constant (initializer or Constant)"))
    for k in spec.get("zero_inputs", []):
        if k < len(node.input) and node.input[k]:
            value = index.array(node.input[k])
            if value is not None and np.any(value != 0):
                out.append(Violation(graph, "ops", name, f"{node.op_type} zero point {node.input[k]} must be 0"))
    limit = spec.get("max_used_outputs")
    if limit is not None:
        used = [o for o in node.output[limit:] if index.used(o)]
        if used:
            out.append(Violation(graph, "ops", name, f"{node.op_type}: only the first {limit} output(s) are "
                                 f"supported, but {used} are used"))
    kind, _, position = spec.get("type_of", "input:0").partition(":")
    tensors = node.input if kind == "input" else node.output
    k = int(position)
    if k < len(tensors) and tensors[k]:
        dtype = index.dtypes.get(tensors[k])
        if dtype is not None and dtype not in spec["dtypes"]:
            out.append(Violation(graph, "ops", name, f"{node.op_type} on {dtype} ({tensors[k]}); TensorRT supports "
                                 f"{', '.join(spec['dtypes'])}"))
    return out


# -- Q/DQ --------------------------------------------------------------------------------
def check_qdq(model, graph: str = "", require_per_channel_weights: bool = True) -> list[Violation]:
    """TensorRT explicit-quantization rules for every QuantizeLinear / DequantizeLinear."""
    index = _GraphIndex(model)
    out: list[Violation] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = _node_name(node, i)
        v = lambda msg: out.append(Violation(graph, "qdq", name, msg))  # noqa: E731
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zp_name = node.input[2] if len(node.input) > 2 else ""
        scale = index.array(scale_name)
        if scale is None:
            v(f"scale {scale_name!r} must be a constant initializer (TensorRT builds scales into the engine)")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            v(f"scale {scale_name} must be finite and > 0")
        if not zp_name:
            v("no zero point: ONNX then defaults to uint8, TensorRT needs an int8 zero point of 0")
        else:
            zp = index.array(zp_name)
            zp_dtype = index.dtypes.get(zp_name)
            if zp is None:
                v(f"zero point {zp_name!r} must be a constant initializer")
            elif zp_dtype != "int8":
                v(f"zero point {zp_name} is {zp_dtype}; TensorRT quantizes to int8 only (use QInt8 / s8s8)")
            elif np.any(zp != 0):
                v(f"zero point {zp_name} is not 0: TensorRT supports symmetric quantization only")
        quantized = node.input[0]
        weight = node.op_type == "DequantizeLinear" and index.is_constant(quantized)
        if weight:
            out += _check_weight_dq(graph, name, node, scale, index, require_per_channel_weights)
        elif scale.size != 1:
            v(f"activation {quantized} is quantized per-channel (scale shape {list(scale.shape)}); TensorRT "
              "quantizes activations per-tensor")
        if node.op_type == "QuantizeLinear":
            bad = [c.op_type for c in index.consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad or node.output[0] in index.graph_outputs:
                v(f"QuantizeLinear output {node.output[0]} feeds {bad or ['a graph output']}; TensorRT needs each Q "
                  "followed by DequantizeLinear (explicit Q/DQ pairs)")
        elif not weight:
            producer = index.producers.get(quantized)
            if producer is None or producer.op_type != "QuantizeLinear":
                v(f"DequantizeLinear input {quantized} is neither an int8 weight nor a QuantizeLinear output")
    return out


def _check_weight_dq(graph, name, node, scale, index: _GraphIndex, per_channel: bool) -> list[Violation]:
    out = []
    shape = index.shape(node.input[0])
    axis = _attr(node, "axis", 1)
    for consumer in index.consumers.get(node.output[0], []):
        if consumer.op_type not in _WEIGHT_AXIS:
            continue
        slot, axis_of = _WEIGHT_AXIS[consumer.op_type]
        if slot >= len(consumer.input) or consumer.input[slot] != node.output[0]:
            continue
        rank = len(shape) if shape is not None else 0
        want = axis_of(consumer, rank)
        if scale.size == 1:
            if per_channel:
                out.append(Violation(graph, "qdq", name, f"weight {node.input[0]} of {consumer.op_type} is "
                                     "quantized per-tensor; the tensorrt preset quantizes weights per-channel"))
            continue
        got = axis + rank if axis < 0 else axis
        if got != want:
            out.append(Violation(graph, "qdq", name, f"weight {node.input[0]} of {consumer.op_type} is quantized "
                                 f"per-channel on axis {got}; TensorRT needs the output-channel axis {want}"))
        elif shape is not None and scale.shape != (shape[want],):
            out.append(Violation(graph, "qdq", name, f"per-channel scale shape {list(scale.shape)} does not match "
                                 f"weight {node.input[0]} dimension {want} ({shape[want]})"))
    return out


# -- profiles ----------------------------------------------------------------------------
Profile = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def check_profiles(graph: str, profiles: Iterable[Profile],
                   shapes: Iterable[Mapping[str, tuple[int, ...]]]) -> list[Violation]:
    """Every fed shape set must fit entirely inside one profile (min <= dim <= max per axis)."""
    profiles = list(profiles)
    out, seen = [], set()
    for feed in shapes:
        key = tuple(sorted((k, tuple(v)) for k, v in feed.items()))
        if key in seen:
            continue
        seen.add(key)
        if not any(_fits(p, feed) for p in profiles):
            reasons = "; ".join(_misfit(p, feed) for p in profiles) or "no profile"
            out.append(Violation(graph, "profiles", "<inputs>", f"fed shapes {dict(key)} fit no profile ({reasons})"))
    return out


def _fits(profile: Profile, feed: Mapping[str, tuple[int, ...]]) -> bool:
    return not _misfit(profile, feed)


def _misfit(profile: Profile, feed: Mapping[str, tuple[int, ...]]) -> str:
    for name, shape in feed.items():
        if name not in profile:
            return f"{name} has no profile entry"
        lo, _, hi = profile[name]
        if len(lo) != len(shape) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return f"{name} {list(shape)} outside [{list(lo)}, {list(hi)}]"
    return ""


class _ShapeRunner:
    """A runner that records input shapes and returns zeros shaped by the manifest signature."""

    def __init__(self, inputs: list[dict], outputs: list[dict], record: list):
        self.inputs, self.outputs, self.record = inputs, outputs, record
        self.input_names = [t["name"] for t in inputs]
        self.output_names = [t["name"] for t in outputs]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.record.append({n: tuple(feed[n].shape) for n in self.input_names})
        dims: dict[str, int] = {}
        for spec in self.inputs:
            for d, size in zip(spec["shape"], feed[spec["name"]].shape):
                if isinstance(d, str):
                    dims[d] = size
        dims["total"] = dims.get("past", 0) + dims.get("seq", 0)
        return {t["name"]: np.zeros([dims[d] if isinstance(d, str) else d for d in t["shape"]],
                                    dtype=np.float32) for t in self.outputs}


def runtime_feed_shapes(bundle, max_batch: int, num_beams: int) -> dict[str, list[dict[str, tuple[int, ...]]]]:
    """The input shapes ``EdgeCoCa`` feeds each graph when embedding ``max_batch`` images and texts and
    captioning them (greedy and beam, up to the context length), plus a decoder prefill of every length.

    Recorded by running the real runtime code on shape-only runners (zero logits never pick the end
    token, so decoding runs to the longest past the runtime can build).
    """
    from coca_edge.runtime.edge import EdgeCoCa
    from coca_edge.tokenizer import Tokenizer

    records: dict[str, list] = {name: [] for name in bundle.manifest["graphs"]}
    runners = {name: _ShapeRunner(*bundle.graph_io(name), records[name]) for name in records}
    edge = EdgeCoCa(bundle, runners, Tokenizer.load(bundle.root))
    size = edge.image_size
    pixels = np.zeros((max_batch, 3, size, size), dtype=np.float32)
    edge.encode_image(pixels, batch_size=max_batch)
    edge.encode_text(["a photo"] * max_batch, batch_size=max_batch)
    longest = edge.layout.context_length - 1
    edge.caption_ids(pixels, batch_size=max_batch, strategy="greedy", max_new_tokens=longest)
    edge.caption_ids(pixels, batch_size=max_batch, strategy="beam", num_beams=num_beams, max_new_tokens=longest)
    inputs, _ = bundle.graph_io("decoder")
    for seq in range(1, edge.layout.context_length + 1):  # prefill: seq tokens at past 0 (export validation)
        dims = {"batch": 1, "seq": seq, "past": 0}
        records["decoder"].append({t["name"]: tuple(dims[d] if isinstance(d, str) else d for d in t["shape"])
                                   for t in inputs})
    return records


def check_bundle(bundle, profiles: Mapping[str, list[Profile]] | None = None, max_batch: int = 8,
                 num_beams: int = 3, qdq: bool | None = None) -> dict[str, list[Violation]]:
    """All checks for every graph of a bundle. ``qdq``: None checks Q/DQ where a graph has any."""
    import onnx

    shapes = runtime_feed_shapes(bundle, max_batch, num_beams) if profiles is not None else {}
    result = {}
    for name in bundle.manifest["graphs"]:
        model = onnx.load(str(bundle.graph_path(name)))
        found = check_ops(model, name)
        has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        if qdq or (qdq is None and has_qdq):
            found += check_qdq(model, name)
        if profiles is not None:
            found += check_profiles(name, profiles[name], shapes[name])
        result[name] = found
    return result
