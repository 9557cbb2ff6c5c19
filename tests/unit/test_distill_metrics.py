"""BLEU-4 and CIDEr-D."""
from __future__ import annotations

import math

import pytest

from coca_edge.data.metrics import bleu4, cider_d


def test_bleu4_identity_and_hand_computed():
    refs = [["a small red circle"], ["a large blue square to the left of a star"]]
    assert bleu4(["a small red circle", "a large blue square to the left of a star"], refs) == pytest.approx(1.0)
    # one hypothesis, 4 words, 1 reference of 5 words: p1=4/4, p2=3/3, p3=2/2, p4=1/1, BP=exp(1-5/4)
    assert bleu4(["a small red circle"], [["a small red circle shape"]]) == pytest.approx(math.exp(1 - 5 / 4))
    assert bleu4(["green"], [["a small red circle"]]) == 0.0


def test_cider_prefers_the_right_caption():
    refs = [["a small red circle"], ["a large blue square"], ["three shapes"]]
    good = cider_d(["a small red circle", "a large blue square", "three shapes"], refs)
    bad = cider_d(["a large blue square", "a small red circle", "three shapes"], refs)
    assert good > bad > 0
    # identical captions score 10 x mean cosine (1) for n-grams with non-zero idf
    assert good == pytest.approx(10 * (1 + 1 + 0.5) / 3, rel=0.35)


def test_bleu4_and_cider_d_equal_pycocoevalcap_golden_values():
    """Golden values written by ``benchmarks/metrics_vs_pycocoevalcap.py --write`` with
    pycocoevalcap 1.2 (``Bleu(4)``, ``Cider``) on the same tokens; observed agreement 1e-11."""
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parents[1] / "data" / "caption_metrics_golden.json").read_text())
    assert len(golden["cases"]) == 3
    for case in golden["cases"]:
        p, r = case["predictions"], case["references"]
        assert abs(bleu4(p, r) - case["pycocoevalcap"]["bleu4"]) < 1e-9, case["name"]
        assert abs(cider_d(p, r) - case["pycocoevalcap"]["cider"]) < 1e-9, case["name"]
