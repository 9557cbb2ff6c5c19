"""BLEU-4 and CIDEr-D."""
from __future__ import annotations

import math

import pytest

from coca_edge.distill.metrics import bleu4, cider_d


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
