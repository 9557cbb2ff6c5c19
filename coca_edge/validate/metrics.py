"""Numbers that compare a candidate with the reference: tensor statistics and caption agreement.

Pure numpy, no model calls: the validator feeds these with what the models produced.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["TensorStats", "compare_tensors", "sqnr_db", "per_sample_cosine", "caption_agreement",
           "topk_accuracy", "STAT_NAMES"]

STAT_NAMES = ("cosine_min", "cosine_mean", "sqnr_db", "max_abs", "mean_abs", "p99_abs")

# p99 of |error| is estimated on at most this many values per update (a strided subsample):
# decoder logits are [rows, 49408] per step and sorting all of them costs more than the models.
_P99_SAMPLE = 200_000


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray, sample_axis: int = 0) -> np.ndarray:
    """Cosine similarity of each sample's flattened tensor (1.0 when both are all zeros)."""
    r = np.moveaxis(np.asarray(reference, np.float64), sample_axis, 0).reshape(reference.shape[sample_axis], -1)
    c = np.moveaxis(np.asarray(candidate, np.float64), sample_axis, 0).reshape(candidate.shape[sample_axis], -1)
    dot = (r * c).sum(axis=1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    both_zero = (np.linalg.norm(r, axis=1) == 0) & (np.linalg.norm(c, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - cand)^2)``; inf when equal."""
    r = np.asarray(reference, np.float64)
    noise = float(((r - np.asarray(candidate, np.float64)) ** 2).sum())
    return _db(float((r ** 2).sum()), noise)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class TensorStats:
    """Streaming comparison of one output over several batches (per-sample cosine, SQNR, |error|)."""

    def __init__(self) -> None:
        self.cosines: list[np.ndarray] = []
        self.signal = self.noise = self.abs_sum = 0.0
        self.count = 0
        self.max_abs = 0.0
        self._abs_sample: list[np.ndarray] = []

    def update(self, reference: np.ndarray, candidate: np.ndarray, sample_axis: int = 0) -> None:
        if reference.shape != candidate.shape:
            raise ValueError(f"cannot compare tensors of shapes {list(reference.shape)} and {list(candidate.shape)}")
        if reference.size == 0:
            return
        r = np.asarray(reference, np.float64)
        err = np.abs(r - np.asarray(candidate, np.float64))
        self.cosines.append(per_sample_cosine(r, candidate, sample_axis))
        self.signal += float((r ** 2).sum())
        self.noise += float((err ** 2).sum())
        self.abs_sum += float(err.sum())
        self.count += err.size
        self.max_abs = max(self.max_abs, float(err.max()))
        flat = err.ravel()
        self._abs_sample.append(flat[:: max(1, flat.size // _P99_SAMPLE)])

    def result(self) -> dict[str, float]:
        if not self.count:
            return {name: math.nan for name in STAT_NAMES}
        cos = np.concatenate(self.cosines)
        return {
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "sqnr_db": _db(self.signal, self.noise),
            "max_abs": self.max_abs,
            "mean_abs": self.abs_sum / self.count,
            "p99_abs": float(np.percentile(np.concatenate(self._abs_sample), 99)),
        }

    def per_sample_cosines(self) -> np.ndarray:
        return np.concatenate(self.cosines) if self.cosines else np.zeros(0)


def compare_tensors(reference: np.ndarray, candidate: np.ndarray, sample_axis: int = 0) -> dict[str, float]:
    """``TensorStats`` of a single pair of tensors."""
    stats = TensorStats()
    stats.update(reference, candidate, sample_axis)
    return stats.result()


def _first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def caption_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict:
    """Token-level agreement of generated id sequences with the reference's own.

    - ``exact_match``: share of identical sequences;
    - ``token_agreement``: per caption, positions with the same token / the longer length;
    - ``first_divergence``: per caption, the index of the first differing token (the common
      length when one is a prefix of the other, so an identical caption counts its length).
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate captions for {len(reference)} reference captions")
    exact, agree, first = [], [], []
    for a, b in zip(reference, candidate):
        a, b = list(a), list(b)
        exact.append(a == b)
        longest = max(len(a), len(b))
        agree.append(sum(x == y for x, y in zip(a, b)) / longest if longest else 1.0)
        first.append(_first_divergence(a, b))
    n = len(exact)
    return {
        "exact_match": float(np.mean(exact)) if n else math.nan,
        "token_agreement": float(np.mean(agree)) if n else math.nan,
        "first_divergence": first,
        "differs": [not e for e in exact],
    }


def topk_accuracy(logits: np.ndarray, labels: Sequence[int], k: int) -> float:
    """Share of rows whose label is among the k largest logits (k capped at the class count)."""
    labels = np.asarray(labels)
    if not len(labels):
        return math.nan
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())
