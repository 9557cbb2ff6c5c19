"""Where a candidate graph starts to drift: node-by-node comparison with the FP32 graph.

Quantizers keep the original output names of the nodes they replace (dynamic INT8 ends its
replacement chain with the old name; QDQ inserts Q/DQ after it), so same-named tensors of
the FP32 and the candidate graph are the same activation. Both graphs are re-saved with
those tensors as extra outputs and run on the same feeds; each FP32 node is charged with
the error it adds: the SQNR of its output below the worst SQNR of its compared inputs.
The quantization fallback excludes the returned node names.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..runtime.generation import fit_cache_feed
from .metrics import TensorStats

__all__ = ["NodeDrift", "localize", "LocalizationError"]

# SQNR of an exactly equal tensor is infinite; charge nodes against this ceiling instead, so
# a node fed exact inputs is charged its full output error (FP32 rounding noise is ~130+ dB).
_SQNR_CAP_DB = 200.0
_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}  # onnx.TensorProto elem types


class LocalizationError(ValueError):
    """The two graphs share no comparable tensors (not the same graph structure)."""


@dataclass(frozen=True)
class NodeDrift:
    graph: str
    node: str
    op_type: str
    output: str
    cosine: float
    sqnr_db: float
    max_abs: float
    added_error_db: float

    def to_dict(self) -> dict:
        return asdict(self)


def _tensor_types(model) -> dict[str, int]:
    """Element type of every value the graph knows (after shape inference where it works)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a best effort; the declared value_info remains
        inferred = model
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type")}


def _with_outputs(model, names: list[str], types: dict[str, int], path: Path) -> Path:
    import onnx

    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No graph rewrites: fusions would merge nodes whose outputs are compared here.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def localize(reference_onnx: str | os.PathLike, candidate_onnx: str | os.PathLike,
             feeds: Iterable[dict[str, np.ndarray]], top_k: int = 10, graph: str = "") -> list[NodeDrift]:
    """Rank the FP32 graph's nodes by the error they add in the candidate graph, worst first."""
    import onnx

    ref = onnx.load(str(reference_onnx))
    cand = onnx.load(str(candidate_onnx))
    ref_types, cand_types = _tensor_types(ref), _tensor_types(cand)
    cand_produced = {o for n in cand.graph.node for o in n.output}
    compared = [o for n in ref.graph.node for o in n.output
                if o and ref_types.get(o) in _FLOAT_TYPES and o in cand_produced and cand_types.get(o) in _FLOAT_TYPES]
    if not compared:
        raise LocalizationError(f"{candidate_onnx}: no intermediate tensor shares a name with {reference_onnx}; "
                                "localisation needs a candidate of the same graph structure")
    stats = {name: TensorStats() for name in compared}
    with tempfile.TemporaryDirectory(prefix="coca-edge-localize-") as tmp:
        ref_sess = _session(_with_outputs(ref, compared, ref_types, Path(tmp) / "reference.onnx"))
        cand_sess = _session(_with_outputs(cand, compared, cand_types, Path(tmp) / "candidate.onnx"))
        ref_inputs = [i.name for i in ref_sess.get_inputs()]
        cand_inputs = [i.name for i in cand_sess.get_inputs()]
        n_feeds = 0
        for feed in feeds:
            # a decoder feed's cache goes in the layout each graph takes (stacked or per layer)
            ref_feed, cand_feed = fit_cache_feed(feed, ref_inputs), fit_cache_feed(feed, cand_inputs)
            r = dict(zip(compared, ref_sess.run(compared, {k: ref_feed[k] for k in ref_inputs})))
            c = dict(zip(compared, cand_sess.run(compared, {k: cand_feed[k] for k in cand_inputs})))
            for name in compared:
                a, b = np.asarray(r[name], np.float64), np.asarray(c[name], np.float64)
                if a.shape == b.shape and a.size:
                    stats[name].update(a.reshape(1, -1), b.reshape(1, -1))
            n_feeds += 1
    if not n_feeds:
        raise LocalizationError("no feeds to run the graphs on")
    results = {name: s.result() for name, s in stats.items() if s.count}
    graph_inputs = {i.name for i in ref.graph.input}

    def sqnr(name: str) -> float | None:
        if name in graph_inputs:
            return _SQNR_CAP_DB  # both graphs get the same feed
        if name in results:
            return min(results[name]["sqnr_db"], _SQNR_CAP_DB)
        return None  # an initializer or a tensor the candidate does not have

    drifts = []
    for i, node in enumerate(ref.graph.node):
        outs = [o for o in node.output if o in results]
        if not outs:
            continue
        worst = min(outs, key=lambda o: results[o]["sqnr_db"])
        out_sqnr = min(results[worst]["sqnr_db"], _SQNR_CAP_DB)
        if out_sqnr >= _SQNR_CAP_DB:
            continue  # bit-identical output: this node adds nothing
        ins = [v for v in (sqnr(x) for x in node.input if x) if v is not None]
        added = (min(ins) if ins else _SQNR_CAP_DB) - out_sqnr
        s = results[worst]
        drifts.append(NodeDrift(graph, node.name or f"{node.op_type}_{i}", node.op_type, worst, s["cosine_min"],
                                s["sqnr_db"], s["max_abs"], float(added)))
    drifts.sort(key=lambda d: (-d.added_error_db, d.sqnr_db))
    return drifts[:top_k] if top_k > 0 else drifts
