"""Pass/fail gates on validation metrics, read from YAML.

A gates file is a mapping ``gates: {metric: "<op> <number>"}``, e.g.::

    gates:
      zero_shot_top1_drop: "<= 0.3"     # percentage points
      caption_exact_match: ">= 0.9"

Metric names are checked when the file is read (a typo is an error, not a gate that never
fires), and a gate whose metric is missing or NaN fails: nothing passes silently.

Optional ``confidence: 0.95`` makes gates on sampled metrics noise-aware. The validator
reports a standard error beside each of them (``zero_shot_top1_drop_se``,
``retrieval_R@1_drop_se``, ``caption_exact_match_se``, ``decoder.logits.top1_agreement_se``,
``hallucination_rate_increase_se``);
with ``confidence`` such a gate fails only when the measurement is beyond its threshold by
more than ``z x se`` (``z`` = 1.64 at 0.95, one-sided), i.e. when the data show the
violation at that confidence. A broken layer costs tens of points and still fails; a
tolerance below the noise of the sample size stops failing at random. Without the key every
gate compares the point estimate, and a gate whose metric has no standard error always does.
"""
from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["GateError", "Gate", "GateResult", "Gates", "load_gates", "shipped_gates", "is_known_metric",
           "METRICS"]

GATES_DIR = Path(__file__).with_name("gates")

# Every flat metric name the validator produces (docs/validation.md explains each).
METRICS = (
    "zero_shot_top1", "zero_shot_top5", "zero_shot_top1_drop", "zero_shot_top1_agreement",
    "zs_color", "zs_shape", "zs_size", "zs_count", "relation", "binding",
    "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "retrieval_R@1", "retrieval_R@1_drop",
    "bleu4", "cider", "caption_exact_match", "caption_token_agreement", "first_divergence_mean",
    "hallucination_rate", "hallucination_rate_increase", "embed_cosine_min",
    "decoder.logits.top1_agreement", "latency_b1_ms", "latency_b8_ms", "bytes", "params",
    "zero_shot_top1_drop_se", "retrieval_R@1_drop_se", "caption_exact_match_se",
    "decoder.logits.top1_agreement_se", "hallucination_rate_increase_se",
)
_TENSOR_METRIC = re.compile(r"^(image_encoder|text_encoder|cross_kv|decoder)\.[A-Za-z0-9_]+\."
                            r"(cosine_min|cosine_mean|sqnr_db|max_abs|mean_abs|p99_abs)$")
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
_EXPR = re.compile(r"^\s*(<=|>=|==|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_TOP_KEYS = {"gates", "description", "confidence"}


class GateError(ValueError):
    """A gates file or gate spec is unusable (names the file and the key)."""


def is_known_metric(name: str) -> bool:
    return name in METRICS or bool(_TENSOR_METRIC.match(name))


@dataclass(frozen=True)
class Gate:
    name: str
    op: str
    allowed: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise GateError(f"gate {self.name}: operator must be one of {', '.join(_OPS)}, got {self.op!r}")
        if not is_known_metric(self.name):
            raise GateError(f"unknown gate metric {self.name!r} (see docs/validation.md for the metric names)")
        if not math.isfinite(self.allowed):
            raise GateError(f"gate {self.name}: threshold must be a finite number, got {self.allowed!r}")

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.allowed:g}"


@dataclass(frozen=True)
class GateResult:
    name: str
    op: str
    allowed: float
    measured: float | None
    passed: bool
    reason: str
    margin: float = 0.0          # z x standard error allowed for sample noise (0: point estimate)

    @property
    def within_noise(self) -> bool:
        """Passed although the point estimate misses the threshold (by less than ``margin``)."""
        return self.passed and self.measured is not None and not _OPS[self.op](self.measured, self.allowed)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "allowed": self.allowed, "measured": self.measured,
                "passed": self.passed, "reason": self.reason, "margin": self.margin}


@dataclass(frozen=True)
class Gates:
    gates: tuple[Gate, ...]
    source: str = "<dict>"
    description: str = ""
    confidence: float | None = None

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Gates":
        if not isinstance(data, Mapping):
            raise GateError(f"{source}: expected a mapping with a 'gates' key, got {type(data).__name__}")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise GateError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
        entries = data.get("gates")
        if not isinstance(entries, Mapping) or not entries:
            raise GateError(f"{source}: 'gates' must be a non-empty mapping of metric: \"<op> <number>\"")
        gates = []
        for name, spec in entries.items():
            match = _EXPR.match(str(spec)) if isinstance(spec, (str, int, float)) else None
            if match is None:
                raise GateError(f"{source}: gates.{name}: expected \"<op> <number>\" with op in "
                                f"{', '.join(_OPS)} (e.g. \"<= 0.3\"), got {spec!r}")
            try:
                gates.append(Gate(str(name), match.group(1), float(match.group(2))))
            except GateError as err:
                raise GateError(f"{source}: gates.{name}: {err}") from None
        confidence = data.get("confidence")
        if confidence is not None:
            if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
                    or not 0.5 <= float(confidence) < 1.0:
                raise GateError(f"{source}: confidence: expected a number in [0.5, 1) (e.g. 0.95), "
                                f"got {confidence!r}")
            confidence = float(confidence)
        return cls(tuple(gates), source, str(data.get("description", "")), confidence)

    def evaluate(self, metrics: Mapping[str, float | None]) -> list[GateResult]:
        results = []
        for gate in self.gates:
            value = metrics.get(gate.name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                why = "metric missing" if gate.name not in metrics or value is None else "metric is NaN"
                results.append(GateResult(gate.name, gate.op, gate.allowed, None, False,
                                          f"not evaluated: {why} (no data for this task or it was skipped)"))
                continue
            value = float(value)
            passed = bool(_OPS[gate.op](value, gate.allowed))
            reason = f"{gate.name} = {value:.6g} {'satisfies' if passed else 'violates'} {gate.op} {gate.allowed:g}"
            margin = self._margin(gate, metrics)
            if not passed and margin > 0 and gate.op != "==":
                # the threshold is within the measurement's noise: not shown to be violated
                shifted = value - margin if gate.op in ("<=", "<") else value + margin
                if _OPS[gate.op](shifted, gate.allowed):
                    passed = True
                    reason = (f"{gate.name} = {value:.6g} is past {gate.op} {gate.allowed:g} by less than its "
                              f"noise ({margin:.3g} = z x standard error at confidence {self.confidence:g})")
                else:
                    reason += f" by more than its noise ({margin:.3g} at confidence {self.confidence:g})"
            results.append(GateResult(gate.name, gate.op, gate.allowed, value, passed, reason, margin))
        return results

    def _margin(self, gate: Gate, metrics: Mapping[str, float | None]) -> float:
        if self.confidence is None:
            return 0.0
        se = metrics.get(f"{gate.name}_se")
        if se is None or not math.isfinite(float(se)) or float(se) <= 0:
            return 0.0
        from statistics import NormalDist

        return NormalDist().inv_cdf(self.confidence) * float(se)


def shipped_gates() -> list[str]:
    return sorted(p.stem for p in GATES_DIR.glob("*.yaml"))


def load_gates(path_or_name: str | os.PathLike) -> Gates:
    """Gates from a YAML file, or a shipped name (``cpu-int8``, ``gpu-fp16``)."""
    import yaml

    path = Path(path_or_name)
    if not path.is_file():
        shipped = GATES_DIR / f"{path_or_name}.yaml"
        if not shipped.is_file():
            raise GateError(f"gates {str(path_or_name)!r}: no such file and not a shipped gates name "
                            f"({', '.join(shipped_gates())})")
        path = shipped
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise GateError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return Gates.from_dict(data, str(path))
