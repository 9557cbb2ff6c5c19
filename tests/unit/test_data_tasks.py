"""Evaluation tasks on synthetic-scenes: definitions, labels, and numpy scoring."""
from __future__ import annotations

import numpy as np
import pytest

from coca_edge.data.synthetic import COLORS, SHAPES, SyntheticScenes
from coca_edge.data.tasks import (
    ChoiceTask,
    ZeroShotTask,
    parse_caption,
    score_caption,
    synthetic_tasks,
)


@pytest.fixture(scope="module")
def tasks():
    return synthetic_tasks("val", n=60)


def test_task_list_and_labels(tasks):
    assert list(tasks) == ["color", "shape", "size", "count", "relation", "binding", "retrieval", "captioning"]
    color = tasks["color"]
    assert color.classnames == tuple(COLORS) and tasks["shape"].classnames == SHAPES
    assert "an orange object" in color.prompts[1]  # articles agree
    assert len(color.samples) == len(color.labels) == 60
    for sample, label in zip(color.samples[:5], color.labels[:5]):
        (obj,) = sample.meta["scene"].objects
        assert color.classnames[label] == obj.color
    count = tasks["count"]
    assert [count.samples[k].meta["scene"].n_objects - 1 for k in range(10)] == list(count.labels[:10])
    relation = tasks["relation"]
    for sample, cands, label in zip(relation.samples[:5], relation.candidates, relation.labels):
        assert parse_caption(cands[label]).relations == [(0, sample.meta["scene"].relation, 1)]
    binding = tasks["binding"]
    assert set(binding.labels) == {0, 1} and binding.chance == 0.5
    retrieval = tasks["retrieval"]
    assert len(retrieval.image_to_texts) == 60 and len(retrieval.texts) <= 60
    assert len(tasks["captioning"].references) == 60


def _oracle_encoder(vocab_tasks):
    """A 'model' whose text embedding is a one-hot of the text and whose image embedding
    is the one-hot of the right text: scoring must give 100%."""
    index = {}

    def encode_text(texts):
        out = np.zeros((len(texts), 4096))
        for k, t in enumerate(texts):
            out[k, index.setdefault(t, len(index))] = 1.0
        return out

    return encode_text, index


def test_zero_shot_scoring(tasks):
    task: ZeroShotTask = tasks["shape"]
    class_embeds = np.eye(len(task.classnames))
    perfect = class_embeds[list(task.labels)] + 0.01
    result = task.score(perfect, class_embeds)
    assert result["accuracy"] == 1.0 and result["balanced_accuracy"] == 1.0 and result["chance"] == pytest.approx(1 / 6)
    constant = np.tile(class_embeds[0], (len(task.labels), 1))
    assert task.score(constant, class_embeds)["accuracy"] == pytest.approx(np.mean(np.array(task.labels) == 0))
    encode_text, _ = _oracle_encoder(None)
    emb = task.class_embeddings(encode_text)
    assert emb.shape[0] == len(task.classnames)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0)


def test_choice_and_retrieval_scoring(tasks):
    encode_text, index = _oracle_encoder(None)
    task: ChoiceTask = tasks["binding"]
    cands = task.candidate_embeddings(encode_text)
    images = np.stack([c[label] for c, label in zip(cands, task.labels)])
    assert task.score(images, cands)["accuracy"] == 1.0
    same = np.ones_like(images)  # a model that cannot tell: ties go to the first candidate
    assert task.score(same, cands)["accuracy"] == pytest.approx(0.5, abs=0.05)
    retrieval = tasks["retrieval"]
    texts = encode_text(list(retrieval.texts))
    images = np.stack([texts[t[0]] for t in retrieval.image_to_texts])
    result = retrieval.score(images, texts)
    assert result["i2t_R@1"] == 1.0 and result["t2i_R@1"] == 1.0
    shuffled = retrieval.score(np.random.default_rng(0).normal(size=images.shape), texts)
    assert shuffled["i2t_R@1"] < 0.2


def test_caption_scoring_counts_hallucinations(tasks):
    task = tasks["captioning"]
    perfect = [refs[0] for refs in task.references]
    result = task.score(perfect)
    assert result["exact_match"] == 1.0 and result["hallucination_rate"] == 0.0 and result["object_recall"] == 1.0
    wrong = task.score(["a large purple star above a small green cross and a tiny thing"] * len(perfect))
    assert wrong["hallucination_rate"] > 0.5 and wrong["exact_match"] == 0.0
    with pytest.raises(ValueError):
        task.score(perfect[:-1])


def test_score_caption_details():
    ds = SyntheticScenes("test")
    scene = next(ds.scene(i) for i in range(100) if ds.scene(i).n_objects == 2)
    a, b = scene.objects
    rel = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
    right = f"a {a.size} {a.color} {a.shape} {rel[scene.relation]} a {b.size} {b.color} {b.shape}"
    r = score_caption(right, scene)
    assert r["hallucinated"] == 0 and r["recalled"] == 2 and r["relation_correct"] == 1 and r["count_correct"]
    flipped = {"left": "right", "right": "left", "above": "below", "below": "above"}[scene.relation]
    r = score_caption(right.replace(rel[scene.relation], rel[flipped]), scene)
    assert r["relation_stated"] == 1 and r["relation_correct"] == 0
    other_color = next(c for c in COLORS if c not in (a.color, b.color))
    r = score_caption(f"a {a.size} {other_color} {a.shape}", scene)
    assert r["hallucinated"] == 1 and r["color_correct"] == 0 and r["shape_correct"] == 1 and not r["count_correct"]
    assert score_caption("two shapes", scene)["count_correct"]
    assert score_caption("", scene)["mentions"] == 0


def test_parse_caption_grammar():
    p = parse_caption("there is a little red circle left of a big blue square")
    assert p.mentions == [{"size": "small", "color": "red", "shape": "circle"}, {"size": "large", "color": "blue", "shape": "square"}]
    assert p.relations == [(0, "left", 1)]
    assert parse_caption("something yellow").mentions == [{"color": "yellow"}]
    assert parse_caption("a small shape").mentions == [{"size": "small"}]
    assert parse_caption("three things, a star, a cross and a circle").count == 3
    assert parse_caption("a red circle under a green star").relations == [(0, "below", 1)]
