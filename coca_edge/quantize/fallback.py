"""Accuracy-aware fallback: quantize, evaluate against gates, return the fewest nodes to FP32.

1. Quantize with the base plan and evaluate it with the validation package (``Validator``
   runs the FP32 reference once; every candidate is compared with it).
2. If a gate fails, rank the FP32 nodes by the error each adds in the candidate
   (validation's ``localize``) and keep those the plan actually quantized.
3. Exclude growing prefixes of that ranking (1, 2, 4, ... nodes), then bisect between the
   last failing and the first passing prefix: the result is the shortest passing prefix
   found, in O(log n) quantize+evaluate rounds. Calibration ranges come from the cache after
   the first round, so a round costs one quantization pass and one evaluation.
4. The manifest records every round (nodes, gated metrics, what the round bought).
   If even the largest allowed prefix fails, ``FallbackFailed`` is raised and nothing is
   written.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import AutoFallbackConfig, QuantizeError

__all__ = ["FallbackFailed", "FallbackStep", "quantize_with_fallback"]




class FallbackFailed(RuntimeError):
    """No mix of precisions within the fallback budget passes the gates (nothing written).
    ``steps``: every mix tried, with what it measured (also listed in the message)."""

    def __init__(self, message: str, steps: list["FallbackStep"] | None = None):
        self.steps = list(steps or [])
        if self.steps:
            message += "\nmixes tried:\n" + "\n".join(f"  {s.summary}" + (f"; fails {'; '.join(s.failed_gates)}"
                                                                          if s.failed_gates else "")
                                                         for s in self.steps)
        super().__init__(message)


@dataclass
class FallbackStep:
    excluded: list[str]
    metrics: dict[str, float | None]
    passed: bool
    failed_gates: list[str] = field(default_factory=list)
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"excluded": self.excluded, "metrics": self.metrics, "passed": self.passed,
                "failed_gates": self.failed_gates, "summary": self.summary}


def _ops(cfg: Any) -> tuple[str, ...] | None:
    """Op types a graph config quantizes (None: every node, as FP16 converts every op)."""
    if cfg.kind == "none":
        return ()
    return tuple(cfg.op_types) if hasattr(cfg, "op_types") else None


def _quantizable(plan: dict[str, Any], drifts: list[Any], graphs: dict[str, Any]) -> list[tuple[str, str]]:
    """(graph, node) of the quantized nodes to blame for the ranked drifts, worst first.

    A ranked node the plan did not quantize (a Reshape after the patch Conv, a LayerNorm
    after a quantized MatMul) shows error made upstream: it is charged to the nearest
    quantized nodes feeding it in the FP32 graph."""
    out: list[tuple[str, str]] = []
    for d in drifts:
        cfg = plan.get(d.graph)
        if cfg is None:
            continue
        ops = _ops(cfg)
        for node in _blame(graphs[d.graph], d.node, ops):
            if (d.graph, node) not in out:
                out.append((d.graph, node))
    return out


def _weighted(node: Any, ops: tuple[str, ...], weights: set[str]) -> bool:
    """A node the quantizer changes: an op it handles, with a constant weight (a MatMul between two
    activations, as in attention, or a Gather picking from a computed tensor stays as it was, so
    returning it to FP32 would change nothing)."""
    if node.op_type not in ops:
        return False
    if node.op_type == "Gather":
        return node.input[0] in weights
    return any(x in weights for x in node.input[:2])


def _blame(model: Any, node_name: str, ops: tuple[str, ...] | None) -> list[str]:
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    start = nodes.get(node_name)
    if start is None or ops == ():
        return []
    if ops is None:
        return [start.name]
    weights = {i.name for i in model.graph.initializer}
    if _weighted(start, ops, weights):
        return [start.name]
    found, seen, frontier = [], {start.name}, [start]
    while frontier and not found:
        nxt = []
        for n in frontier:
            for tensor in n.input:
                p = producer.get(tensor)
                if p is None or p.name in seen:
                    continue
                seen.add(p.name)
                (found if _weighted(p, ops, weights) else nxt).append(p)
        frontier = nxt
    return [n.name for n in found]


def _packed_head(plan: dict[str, Any], graphs: dict[str, Any]) -> list[str]:
    """The decoder's logits nodes when the plan stores them as blocks (``logits_block_bits``)."""
    from .methods import _producers

    cfg = plan.get("decoder")
    if cfg is None or "decoder" not in graphs or not (getattr(cfg, "keep_logits", False)
                                                      and getattr(cfg, "logits_block_bits", 0)):
        return []
    return [n for n in _producers(graphs["decoder"], "logits") if n not in cfg.exclude_nodes]


def _with_fallback(plan: dict[str, Any], nodes: list[tuple[str, str]]) -> dict[str, Any]:
    by_graph: dict[str, list[str]] = {}
    for graph, node in nodes:
        by_graph.setdefault(graph, []).append(node)
    return {g: (cfg.with_excluded(tuple(by_graph[g])) if g in by_graph else cfg) for g, cfg in plan.items()}


def quantize_with_fallback(bundle_dir: str | os.PathLike, config: AutoFallbackConfig, out_dir: str | os.PathLike,
                           calib: Any = None, *, calib_samples: int | None = None, overwrite: bool = False,
                           progress: bool = True, cache_dir: str | os.PathLike | None = None) -> Path:
    import onnx

    from coca_edge.runtime.bundle import Bundle
    from coca_edge.validate import GateError, Validator, load_gates

    from .api import _check_fp32, _check_out, quantize, resolve_plan

    bundle = Bundle.load(bundle_dir)
    _check_fp32(bundle)
    out_dir = Path(out_dir)
    _check_out(bundle.root, out_dir, overwrite)
    try:
        gates = load_gates(config.gates)
    except GateError as err:
        raise QuantizeError(str(err)) from None
    plan = resolve_plan(config.base, list(bundle.manifest["graphs"]))
    try:
        validator = Validator(bundle.root, config.eval_data, config.eval_samples, progress=progress,
                              corpus_metrics=any(g.name in ("bleu4", "cider") for g in gates.gates))
    except ValueError as err:  # validation's typed input errors (unknown dataset, empty split, ...)
        raise QuantizeError(f"evaluation data {config.eval_data}: {err}") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-fallback-", dir=out_dir.parent))
    steps: list[FallbackStep] = []
    try:
        def attempt(nodes: list[tuple[str, str]]) -> tuple[Path, FallbackStep]:
            path = quantize(bundle.root, _with_fallback(plan, nodes), work / f"n{len(nodes)}", calib,
                            calib_samples=calib_samples, progress=False, cache_dir=cache_dir)
            result = validator.evaluate(path, latency=False)
            gated = gates.evaluate(result.metrics)
            step = FallbackStep([f"{g}/{n}" for g, n in nodes], {r.name: r.measured for r in gated},
                                all(r.passed for r in gated), [r.reason for r in gated if not r.passed])
            base = steps[0].metrics if steps else step.metrics
            bought = ", ".join(f"{k} {round(base[k], 6):.4g} -> {round(v, 6):.4g}" for k, v in step.metrics.items()
                               if v is not None and base.get(k) is not None and v != base[k])
            step.summary = (f"{len(nodes)} node(s) FP32: {'pass' if step.passed else 'fail'}"
                            f"{' (' + bought + ')' if bought else ''}")
            steps.append(step)
            return path, step

        path, first = attempt([])
        chosen: list[tuple[str, str]] = []
        if not first.passed:
            drifts, _notes = validator.localize(path, top_k=config.top_k)
            graphs = {g: onnx.load(str(bundle.graph_path(g)), load_external_data=False) for g in plan}
            ranked = _quantizable(plan, drifts, graphs)
            # The block-packed vocabulary head goes back first, whatever its SQNR rank: it decides
            # every argmax, and localisation ranks it last (docs/quantization.md).
            head = [("decoder", n) for n in _packed_head(plan, graphs)]
            ranked = (head + [r for r in ranked if r not in head])[:config.max_nodes]
            if not ranked:
                raise FallbackFailed(f"gates {config.gates} fail ({'; '.join(first.failed_gates)}) and localisation "
                                     "found no quantized node to return to FP32; nothing written", steps)
            path, chosen = _search(attempt, ranked)
            if path is None:
                raise FallbackFailed(
                    f"no mix passes gates {config.gates}: with the {len(ranked)} most sensitive quantized node(s) "
                    f"in FP32 it still fails ({'; '.join(steps[-1].failed_gates)}); nothing written", steps)
        final = quantize(bundle.root, _with_fallback(plan, chosen), out_dir, calib, calib_samples=calib_samples,
                         overwrite=overwrite, progress=False, cache_dir=cache_dir,
                         extra_manifest={"fallback": {
                             "gates": gates.source, "eval_data": config.eval_data,
                             "eval_samples": config.eval_samples,
                             "fallback_nodes": [f"{g}/{n}" for g, n in chosen],
                             "steps": [s.to_dict() for s in steps]}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _search(attempt, ranked: list[tuple[str, str]]) -> tuple[Path | None, list[tuple[str, str]]]:
    """Shortest passing prefix of ``ranked``: doubling, then bisection."""
    lo, hi, hi_path = 0, None, None  # prefix lo fails (0 failed already); hi passes
    n = 1
    while True:
        size = min(n, len(ranked))
        path, step = attempt(ranked[:size])
        if step.passed:
            hi, hi_path = size, path
            break
        lo = size
        if size == len(ranked):
            return None, []
        n *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        path, step = attempt(ranked[:mid])
        if step.passed:
            hi, hi_path = mid, path
        else:
            lo = mid
    return hi_path, ranked[:hi]
