"""Our BLEU-4 / CIDEr-D (``coca_edge.data.metrics``) against pycocoevalcap's ``Bleu(4)`` and
``Cider`` on a fixed, seeded caption set, and the golden file the unit test checks.

Not a test and not a dependency: it needs ``pip install pycocoevalcap`` (a 104 MB wheel that
bundles Java tools) only to (re)write ``tests/data/caption_metrics_golden.json``:

    python benchmarks/metrics_vs_pycocoevalcap.py            # compare and print
    python benchmarks/metrics_vs_pycocoevalcap.py --write    # also rewrite the golden file

Both sides see the same tokens (lower-case alphanumeric words joined by spaces), so the
comparison is of the metrics, not of the tokenizers (pycocoevalcap's PTB tokenizer needs Java).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "caption_metrics_golden.json"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]


def caption_set(seed: int = 0, n: int = 80) -> tuple[list[str], list[list[str]]]:
    """Scene-like references (1-3 per image) and predictions ranging from exact copies to
    wrong attributes, dropped and repeated words, other word orders and empty captions."""
    rng = random.Random(seed)
    predictions, references = [], []
    for i in range(n):
        objs = [(rng.choice(["small", "large"]), rng.choice(COLOURS), rng.choice(SHAPES))
                for _ in range(rng.randint(1, 3))]
        phrase = [f"a {s} {c} {h}" for s, c, h in objs]
        refs = ["a photo of " + " and ".join(phrase)]
        if rng.random() < 0.5:
            refs.append(" and ".join(reversed(phrase)) + " on a plain background")
        if rng.random() < 0.3:
            refs.append(f"{len(objs)} shapes: " + ", ".join(f"{c} {h}" for _, c, h in objs))
        words = refs[0].split()
        kind = i % 6
        if kind == 0:
            pred = refs[0]
        elif kind == 1:
            pred = " ".join(rng.choice(COLOURS) if w in COLOURS else w for w in words)
        elif kind == 2:
            pred = " ".join(w for w in words if rng.random() > 0.25)
        elif kind == 3:
            pred = " ".join(words + words[-2:])
        elif kind == 4:
            pred = " ".join(rng.sample(words, len(words)))
        else:
            pred = "" if i % 12 == 5 else " ".join(words[:2])
        predictions.append(pred)
        references.append(refs)
    return predictions, references


def pycocoevalcap_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from coca_edge.data.metrics import caption_tokens

    res = {i: [" ".join(caption_tokens(p))] for i, p in enumerate(predictions)}
    gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN.relative_to(GOLDEN.parents[2])}")
    args = ap.parse_args()
    from coca_edge.data.metrics import bleu4, cider_d

    import pycocoevalcap

    predictions, references = caption_set()
    subsets = {"all": slice(None), "first 30": slice(0, 30), "exact copies": slice(0, None, 6)}
    golden = {"pycocoevalcap_version": getattr(pycocoevalcap, "__version__", "1.2"), "cases": []}
    print(f"{'subset':<14}{'ours BLEU-4':>14}{'pycoco BLEU-4':>15}{'ours CIDEr-D':>14}{'pycoco CIDEr':>14}{'max |diff|':>12}")
    for name, sl in subsets.items():
        p, r = predictions[sl], references[sl]
        ref = pycocoevalcap_scores(p, r)
        ours = {"bleu4": bleu4(p, r), "cider": cider_d(p, r)}
        diff = max(abs(ours[k] - ref[k]) for k in ref)
        print(f"{name:<14}{ours['bleu4']:>14.6f}{ref['bleu4']:>15.6f}{ours['cider']:>14.6f}{ref['cider']:>14.6f}{diff:>12.2e}")
        golden["cases"].append({"name": name, "predictions": p, "references": r, "pycocoevalcap": ref})
    if args.write:
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
