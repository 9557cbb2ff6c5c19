"""Caption metrics without Java or torch: corpus BLEU-4 and CIDEr-D.

Both follow pycocoevalcap (``Bleu(4)`` with its "closest" reference length, ``CiderD`` with
sigma 6, clipped counts and the x10 scale, document frequencies from the evaluated set's
references). Tokenisation is lower-case alphanumeric words, which matches the PTB
tokenizer on plain captions like the synthetic ones.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

__all__ = ["bleu4", "cider_d", "caption_tokens"]


def caption_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (uniform weights, brevity penalty against the closest reference length)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        hyp = caption_tokens(pred)
        ref_tokens = [caption_tokens(r) for r in refs]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015 as in pycocoevalcap), averaged over images."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    refs_tok = [[caption_tokens(r) for r in refs] for refs in references]
    hyps_tok = [caption_tokens(p) for p in predictions]
    n_images = len(refs_tok)
    if n_images == 0:
        return float("nan")
    df: Counter = Counter()
    for refs in refs_tok:
        seen = set()
        for r in refs:
            for n in range(1, 5):
                seen.update(_ngrams(r, n))
        df.update(seen)
    log_n = math.log(float(n_images))

    def vec(words: list[str]) -> tuple[list[dict], list[float]]:
        out, norms = [], []
        for n in range(1, 5):
            v = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()}
            out.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return out, norms

    scores = []
    for hyp, refs in zip(hyps_tok, refs_tok):
        hv, hn = vec(hyp)
        total = np.zeros(4)
        for ref in refs:
            rv, rn = vec(ref)
            delta = len(hyp) - len(ref)
            for n in range(4):
                dot = sum(min(val, rv[n][g]) * rv[n][g] for g, val in hv[n].items() if g in rv[n])
                if hn[n] and rn[n]:
                    total[n] += dot / (hn[n] * rn[n]) * math.exp(-(delta ** 2) / (2 * sigma ** 2))
        scores.append(float(total.mean() / len(refs) * 10.0))
    return float(np.mean(scores))
