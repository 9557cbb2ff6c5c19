"""Ablation variants change only the KD weights and the initialisation."""
from __future__ import annotations

from pathlib import Path

from coca_edge.distill.ablation import VARIANTS, _markdown, _variant
from coca_edge.distill.config import TrainConfig


def test_variants_switch_only_kd_terms_and_init(tmp_path):
    base = TrainConfig.from_dict({"model": "test-tiny", "init": "inherit", "steps": 50, "teacher": {"path": "t"},
                                  "loss": {"affinity": 1.0, "feature": 2.0, "caption_kd": 0.5}})
    none = _variant(base, "no KD", tmp_path, 50)
    assert (none.loss.affinity, none.loss.feature, none.loss.caption_kd, none.init) == (0, 0, 0, "scratch")
    feat = _variant(base, "feature", tmp_path, 30)
    assert (feat.loss.affinity, feat.loss.feature, feat.loss.caption_kd, feat.steps) == (0, 2.0, 0, 30)
    full = _variant(base, "inherit + all KD", tmp_path, 50, live=True)
    assert (full.loss.affinity, full.loss.caption_kd, full.init, full.teacher.use_cache) == (1.0, 0.5, "inherit", False)
    assert len({Path(_variant(base, n, tmp_path, 5).output_dir) for n in VARIANTS}) == len(VARIANTS)
    table = _markdown({"teacher": {"params": 1e6, "zero_shot_top1": 0.8, "retrieval_R@1": 0.5}, "student_params": 2e5,
                       "rows": [{"budget": "same steps", "variant": "no KD", "steps": 5, "seconds": 1.0, "samples_per_s": 9.0,
                                 "zero_shot_top1": 0.4, "retrieval_R@1": 0.5}]})
    assert "| same steps | no KD | 5 |" in table and "50.000 | 100.000 |" in table
