"""Validation metrics, gates and task scoring against hand-computed values (no model runs)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from coca_edge.data import RetrievalTask, ZeroShotTask
from coca_edge.validate import (GateError, Gates, TensorStats, caption_agreement, compare_tensors, load_gates,
                                per_sample_cosine, shipped_gates, sqnr_db)
from coca_edge.validate.data import BoundTask, EvalData
from coca_edge.validate.metrics import topk_accuracy
from coca_edge.validate.validator import ModelOutputs, score_tasks


def test_tensor_stats_hand_computed():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    cand = np.array([[3.0, 4.0], [0.0, 1.0]])
    np.testing.assert_allclose(per_sample_cosine(ref, cand), [1.0, 0.0])
    stats = compare_tensors(ref, cand)
    # signal 9+16+1 = 26, noise 1+1 = 2 -> 10*log10(13)
    assert stats["sqnr_db"] == pytest.approx(10 * math.log10(13))
    assert stats["cosine_min"] == pytest.approx(0.0)
    assert stats["cosine_mean"] == pytest.approx(0.5)
    assert stats["max_abs"] == 1.0
    assert stats["mean_abs"] == pytest.approx(0.5)
    assert sqnr_db(ref, ref) == math.inf


def test_tensor_stats_stream_over_batches_and_sample_axis():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 2, 6, 3))  # samples on axis 2, like a KV cache [L, 2, B, ...]
    cand = ref + rng.normal(scale=0.1, size=ref.shape)
    whole = compare_tensors(ref, cand, sample_axis=2)
    stats = TensorStats()
    stats.update(ref[:, :, :4], cand[:, :, :4], 2)
    stats.update(ref[:, :, 4:], cand[:, :, 4:], 2)
    parts = stats.result()
    for key in ("cosine_min", "cosine_mean", "sqnr_db", "max_abs", "mean_abs"):
        assert parts[key] == pytest.approx(whole[key])
    expected = [np.dot(ref[:, :, b].ravel(), cand[:, :, b].ravel())
                / np.linalg.norm(ref[:, :, b]) / np.linalg.norm(cand[:, :, b]) for b in range(6)]
    np.testing.assert_allclose(stats.per_sample_cosines(), expected)
    with pytest.raises(ValueError, match="shapes"):
        stats.update(ref, cand[:1], 2)


def test_caption_agreement_hand_computed():
    ref = [[1, 2, 3], [1, 2, 3], [5]]
    cand = [[1, 2, 3], [1, 9, 3, 4], [6]]
    out = caption_agreement(ref, cand)
    assert out["exact_match"] == pytest.approx(1 / 3)
    # per caption: 3/3, 2 of 4 positions agree, 0/1
    assert out["token_agreement"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["first_divergence"] == [3, 1, 0]
    assert out["differs"] == [False, True, True]
    # a prefix diverges where the shorter one ends
    assert caption_agreement([[1, 2]], [[1, 2, 7]])["first_divergence"] == [2]


def test_topk_accuracy():
    logits = np.array([[0.9, 0.1, 0.5], [0.1, 0.2, 0.3]])
    assert topk_accuracy(logits, [2, 0], 1) == 0.0
    assert topk_accuracy(logits, [2, 0], 2) == 0.5
    assert topk_accuracy(logits, [2, 0], 5) == 1.0  # k capped at the number of classes


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_score_tasks_hand_computed():
    """Zero-shot on 4 images / 2 classes and retrieval on 3 images, embeddings placed by hand."""
    zs = ZeroShotTask("color", ("red", "blue"), (("a red object",), ("a blue object",)), list(range(4)),
                      (0, 0, 1, 1))
    ret = RetrievalTask("retrieval", list(range(3)), ("t0", "t1", "t2"), ((0,), (1,), (2,)))
    data = EvalData("hand", np.zeros((4, 3, 2, 2), np.float32), zero_shot={"color": BoundTask(zs, np.arange(4))},
                    retrieval=BoundTask(ret, np.arange(3)))
    texts = data.texts
    assert texts == ["a red object", "a blue object", "t0", "t1", "t2"]
    e = np.eye(3)
    # images 0, 1 near class red (e0); image 2 near red too (wrong); image 3 near blue (e1)
    image_embed = _unit([e[0] + 0.1 * e[2], e[0] + 0.2 * e[1], e[0] + 0.1 * e[1], e[1]])
    # retrieval texts: t0 = image 0's direction, t1 = e1 (image 1 is the most e1-like), t2 = e2
    text_embed = _unit([e[0], e[1], e[0] + 0.1 * e[2], e[1], e[2]])
    scores = score_tasks(data, texts, ModelOutputs(image_embed, text_embed, [], []))
    m = scores["metrics"]
    assert m["zs_color"] == 0.75  # image 2 (blue) is closer to red
    assert m["zero_shot_top1"] == 0.75
    assert m["zero_shot_top5"] == 1.0
    np.testing.assert_array_equal(scores["preds"]["color"], [0, 0, 0, 1])
    # i2t: every image is closest to t0 (all lean on e0) -> only image 0 hits
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    # t2i: t0 -> image 0 (hit), t1 -> image 1 (0.196 > 0.0995, hit), t2 -> image 0 (only one with e2: miss)
    assert m["t2i_R@1"] == pytest.approx(2 / 3)
    assert m["retrieval_R@1"] == pytest.approx((m["i2t_R@1"] + m["t2i_R@1"]) / 2)
    assert m["i2t_R@10"] == 1.0
    np.testing.assert_array_equal(scores["hits"]["zs_color"], [True, True, False, True])
    np.testing.assert_array_equal(scores["hits"]["i2t_R@1"], [True, False, False])
    np.testing.assert_array_equal(scores["hits"]["t2i_R@1"], [True, True, False])


def test_drop_standard_errors_hand_computed():
    from coca_edge.validate.validator import _drop_standard_errors, _proportion_se

    ref = {"zs_a": np.array([1, 1, 1, 1], bool), "zs_b": np.array([1, 0, 1, 0], bool),
           "i2t_R@1": np.array([1, 1, 0, 0], bool), "t2i_R@1": np.array([1, 1, 1, 1], bool)}
    cand = {"zs_a": np.array([1, 1, 0, 1], bool), "zs_b": np.array([1, 0, 1, 0], bool),
            "i2t_R@1": np.array([1, 0, 1, 0], bool), "t2i_R@1": np.array([1, 1, 1, 1], bool)}
    se = _drop_standard_errors(ref, cand)
    # zs_a differences (0, 0, 1, 0): variance 0.25 (ddof 1) / 4 samples; zs_b identical: 0.
    assert se["zero_shot_top1_drop_se"] == pytest.approx(100 * math.sqrt(0.25 / 4) / 2)
    # i2t differences (0, 1, -1, 0): variance 2/3 / 4; t2i identical.
    assert se["retrieval_R@1_drop_se"] == pytest.approx(100 * math.sqrt((2 / 3) / 4) / 2)
    assert _drop_standard_errors(ref, ref) == {"zero_shot_top1_drop_se": 0.0, "retrieval_R@1_drop_se": 0.0}
    assert _proportion_se(0.9, 100) == pytest.approx(0.03)


def test_hallucination_increase_se_matches_a_paired_bootstrap():
    """The delta-method standard error of (candidate - reference) hallucination rate, paired
    on the same captions, against the spread of that increase over paired resamples."""
    from coca_edge.validate.validator import _ratio_increase_se

    rng = np.random.default_rng(0)
    n = 400
    mentions = rng.integers(1, 4, n).astype(float)
    ref_h = rng.binomial(mentions.astype(int), 0.25).astype(float)
    cand_h = ref_h.copy()
    flip = rng.random(n) < 0.15  # the candidate changes 15% of captions, both ways
    cand_h[flip] = rng.binomial(mentions[flip].astype(int), 0.3)
    cand_m = mentions.copy()
    cand_m[np.flatnonzero(flip)[:10]] += 1  # and mentions one more object in a few of them
    ref = {"hallucinated": ref_h, "mentions": mentions}
    cand = {"hallucinated": cand_h, "mentions": cand_m}
    se = _ratio_increase_se(ref, cand, "hallucinated", "mentions")
    boot = []
    for _ in range(2000):
        i = rng.integers(0, n, n)
        boot.append(100 * (cand_h[i].sum() / cand_m[i].sum() - ref_h[i].sum() / mentions[i].sum()))
    assert se == pytest.approx(float(np.std(boot)), rel=0.05)
    assert _ratio_increase_se(ref, ref, "hallucinated", "mentions") == 0.0
    short = {k: v[:10] for k, v in cand.items()}
    assert math.isnan(_ratio_increase_se(ref, short, "hallucinated", "mentions"))
    silent = {"hallucinated": np.zeros(n), "mentions": np.zeros(n)}
    assert math.isnan(_ratio_increase_se(ref, silent, "hallucinated", "mentions"))
    assert math.isnan(_ratio_increase_se(ref, {}, "hallucinated", "mentions"))


def test_score_tasks_records_per_caption_hallucination_counts():
    from coca_edge.data import CaptionTask, SyntheticScenes
    from coca_edge.data.tasks import reference_captions, score_caption

    ds = SyntheticScenes("val", length=6)
    scenes = tuple(ds.scene(i) for i in range(6))
    task = CaptionTask("captioning", [ds[i] for i in range(6)], tuple(tuple(reference_captions(s)) for s in scenes),
                       scenes)
    data = EvalData("hand", np.zeros((6, 3, 2, 2), np.float32), captioning=BoundTask(task, np.arange(6)))
    captions = [ds.caption(i) for i in range(5)] + ["a big red star and a small blue circle"]
    scores = score_tasks(data, data.texts, ModelOutputs(np.zeros((6, 2)), np.zeros((0, 2)), [], captions),
                         corpus_metrics=False)
    h, m = scores["hits"]["hallucinated"], scores["hits"]["mentions"]
    assert h.tolist() == [score_caption(c, sc)["hallucinated"] for c, sc in zip(captions, scenes)]
    assert m.tolist() == [score_caption(c, sc)["mentions"] for c, sc in zip(captions, scenes)]
    assert h[:5].sum() == 0 and h[5] > 0  # the generator's own captions are right, the made-up one is not
    assert scores["metrics"]["hallucination_rate"] == pytest.approx(h.sum() / m.sum())


def test_confidence_gates_fail_only_on_violations_beyond_the_noise(tmp_path):
    spec = {"gates": {"retrieval_R@1_drop": "<= 0.5", "caption_exact_match": ">= 0.9",
                      "embed_cosine_min": ">= 0.99"}}
    metrics = {"retrieval_R@1_drop": 1.4, "retrieval_R@1_drop_se": 1.0,      # 1.4 - 1.64 < 0.5: noise
               "caption_exact_match": 0.85, "caption_exact_match_se": 0.01,   # 0.85 + 0.016 < 0.9: real
               "embed_cosine_min": 0.98}                                      # no standard error
    plain = Gates.from_dict(spec).evaluate(metrics)
    assert [r.passed for r in plain] == [False, False, False] and all(r.margin == 0 for r in plain)
    noisy = Gates.from_dict({**spec, "confidence": 0.95}).evaluate(metrics)
    assert [r.passed for r in noisy] == [True, False, False]
    assert noisy[0].margin == pytest.approx(1.6449, abs=1e-3) and "less than its noise" in noisy[0].reason
    assert "more than its noise" in noisy[1].reason and noisy[2].margin == 0
    # a broken model (a drop of tens of points) fails however noisy the metric
    assert not Gates.from_dict({**spec, "confidence": 0.99}).evaluate(
        {**metrics, "retrieval_R@1_drop": 20.0})[0].passed
    path = tmp_path / "gates.yaml"
    path.write_text("confidence: 95\ngates:\n  retrieval_R@1_drop: '<= 0.5'\n")
    with pytest.raises(GateError, match=r"gates\.yaml.*confidence.*\[0.5, 1\)"):
        load_gates(path)


def test_shipped_gates_load_and_evaluate():
    assert {"cpu-int8", "gpu-fp16"} <= set(shipped_gates())
    for name in ("cpu-int8", "gpu-fp16"):
        gates = load_gates(name)
        assert gates.gates and gates.description
    gates = Gates.from_dict({"gates": {"zero_shot_top1_drop": "<= 0.3", "embed_cosine_min": ">= 0.99",
                                       "image_encoder.image_embed.sqnr_db": "> 30"}})
    results = gates.evaluate({"zero_shot_top1_drop": 0.2, "embed_cosine_min": 0.98,
                              "image_encoder.image_embed.sqnr_db": math.inf})
    assert [r.passed for r in results] == [True, False, True]
    assert results[1].measured == 0.98 and results[1].allowed == 0.99 and results[1].op == ">="


def test_missing_or_nan_metric_fails_its_gate():
    gates = Gates.from_dict({"gates": {"caption_exact_match": ">= 0.9", "hallucination_rate_increase": "<= 1"}})
    results = gates.evaluate({"hallucination_rate_increase": float("nan")})
    assert not any(r.passed for r in results)
    assert all(r.reason.startswith("not evaluated: ") for r in results)
    assert all(r.measured is None for r in results)


def test_bad_gates_are_errors_naming_file_and_key(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text("gates:\n  zero_shot_top1_dorp: '<= 0.3'\n")
    with pytest.raises(GateError, match=r"gates\.yaml.*zero_shot_top1_dorp"):
        load_gates(path)
    path.write_text("gate:\n  zero_shot_top1_drop: '<= 0.3'\n")
    with pytest.raises(GateError, match=r"gates\.yaml.*unknown key.*'gate'"):
        load_gates(path)
    path.write_text("gates:\n  zero_shot_top1_drop: 'at most 0.3'\n")
    with pytest.raises(GateError, match=r"gates\.zero_shot_top1_drop.*<op> <number>"):
        load_gates(path)
    path.write_text("gates: [unclosed\n")
    with pytest.raises(GateError, match="not valid YAML"):
        load_gates(path)
    with pytest.raises(GateError, match="cpu-int4.*cpu-int8"):
        load_gates("cpu-int4")


def test_reports_explain_a_pass_within_noise():
    """A PASS~ verdict never stands unexplained: table, markdown and HTML carry the legend, and
    the gate's own row says by how much the noise covered the miss."""
    from types import SimpleNamespace

    from coca_edge.validate.report import format_table, render_html, render_markdown, summary_rows

    gates = Gates.from_dict({"confidence": 0.95, "gates": {"retrieval_R@1_drop": "<= 0.5",
                                                           "zero_shot_top1_drop": "<= 0.3"}})

    def result(name, metrics, gate_results):
        return SimpleNamespace(name=name, spec=name, metrics=metrics, gate_results=gate_results, tensor={},
                               localization=[], captions=[], notes=[], cosines={}, logits=None)

    def report(metrics):
        cand = result("INT8", metrics, gates.evaluate(metrics))
        return SimpleNamespace(
            data={"source": "synthetic-scenes:val", "images": 4, "captioned": 2, "texts": 8, "tensor_samples": 2,
                  "max_new_tokens": 20},
            reference=result("FP32", {}, []), results=[cand], notes=[], seconds=1.0, validator=None,
            passed=all(g.passed for g in cand.gate_results))

    noisy = report({"retrieval_R@1_drop": 1.4, "retrieval_R@1_drop_se": 1.0, "zero_shot_top1_drop": 0.1})
    assert summary_rows(noisy)[-1][-1] == "PASS~1"
    assert "PASS~n:" in format_table(summary_rows(noisy))
    md = render_markdown(noisy)
    assert "PASS~n:" in md and "pass within noise: retrieval_R@1_drop" in md
    assert "PASS~n:" in render_html(noisy, plots={})
    clean = report({"retrieval_R@1_drop": 0.2, "retrieval_R@1_drop_se": 1.0, "zero_shot_top1_drop": 0.1})
    assert summary_rows(clean)[-1][-1] == "PASS"
    assert "PASS~" not in format_table(summary_rows(clean)) and "PASS~" not in render_markdown(clean)
