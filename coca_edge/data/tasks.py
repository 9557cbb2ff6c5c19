"""Evaluation tasks: zero-shot classification, multiple-choice matching, retrieval and
captioning, with numpy scoring from embeddings or generated captions.

Tasks only define data (samples, class names, prompts, candidates, references) and
score what a model produced; they never run a model, so they serve the torch model, ONNX
Runtime and TensorRT alike. On ``synthetic-scenes`` (``synthetic_tasks``):

=========== ============================================== =========== =======
task        what                                           kind        chance
=========== ============================================== =========== =======
color       colour of the object (one-object scenes)       zero-shot   1/8
shape       shape of the object (one-object scenes)        zero-shot   1/6
size        size of the object (one-object scenes)         zero-shot   1/2
count       number of objects                              zero-shot   1/3
relation    left of / right of / above / below             choice      1/4
binding     which object has which colour                  choice      1/2
retrieval   image <-> canonical description                retrieval
captioning  generated caption vs scene                     captioning
=========== ============================================== =========== =======
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .readers import Sample
from .synthetic import (
    COLORS,
    OPPOSITE,
    RELATION_WORDS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Scene,
    SceneConfig,
    SyntheticScenes,
    reference_captions,
)

__all__ = [
    "IndexedSamples",
    "ZeroShotTask",
    "ChoiceTask",
    "RetrievalTask",
    "CaptionTask",
    "ParsedCaption",
    "synthetic_tasks",
    "fill_templates",
    "normalize_caption",
    "parse_caption",
    "score_caption",
    "score_captions",
]

EncodeText = Callable[[list[str]], np.ndarray]


class IndexedSamples(Sequence[Sample]):
    """A lazy view ``dataset[indices[k]]``: images are rendered or read only when used."""

    def __init__(self, dataset: Any, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = tuple(int(i) for i in indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return IndexedSamples(self.dataset, self.indices[k])
        return self.dataset[self.indices[k]]

    def __iter__(self) -> Iterator[Sample]:
        for i in self.indices:
            yield self.dataset[i]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Per class, every template with ``{}`` replaced by the class name."""
    return tuple(tuple(t.format(name) for t in templates) for name in classnames)


@dataclass(eq=False)
class ZeroShotTask:
    """Classify images by similarity to class prompts (averaged per class, CLIP-style).

    ``samples`` carry their class in ``meta['label']``; ``labels`` repeats them so
    scoring needs no image.
    """

    name: str
    classnames: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    samples: Sequence[Sample]
    labels: tuple[int, ...]
    description: str = ""
    kind: str = field(default="zero_shot", init=False)

    def __post_init__(self):
        if len(self.prompts) != len(self.classnames):
            raise ValueError(f"{self.name}: {len(self.prompts)} prompt lists for {len(self.classnames)} classes")
        if len(self.labels) != len(self.samples):
            raise ValueError(f"{self.name}: {len(self.labels)} labels for {len(self.samples)} samples")

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classnames)

    def class_embeddings(self, encode_text: EncodeText) -> np.ndarray:
        """[C, D]: per class the normalised mean of its normalised prompt embeddings."""
        flat = [p for prompts in self.prompts for p in prompts]
        emb = _unit(encode_text(flat))
        out, start = [], 0
        for prompts in self.prompts:
            out.append(emb[start : start + len(prompts)].mean(axis=0))
            start += len(prompts)
        return _unit(np.stack(out))

    def score(self, image_embeds: np.ndarray, class_embeds: np.ndarray) -> dict[str, Any]:
        logits = _unit(image_embeds) @ _unit(class_embeds).T
        pred = logits.argmax(axis=1)
        labels = np.asarray(self.labels)
        per_class = {}
        for c, name in enumerate(self.classnames):
            mask = labels == c
            if mask.any():
                per_class[name] = float((pred[mask] == c).mean())
        return {
            "task": self.name,
            "n": int(len(labels)),
            "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
            "balanced_accuracy": float(np.mean(list(per_class.values()))) if per_class else float("nan"),
            "chance": self.chance,
            "per_class": per_class,
        }


@dataclass(eq=False)
class ChoiceTask:
    """Pick the matching text among per-image candidates (``labels[i]`` is the right one)."""

    name: str
    samples: Sequence[Sample]
    candidates: tuple[tuple[str, ...], ...]
    labels: tuple[int, ...]
    description: str = ""
    kind: str = field(default="choice", init=False)

    @property
    def chance(self) -> float:
        return float(np.mean([1.0 / len(c) for c in self.candidates])) if self.candidates else float("nan")

    def candidate_embeddings(self, encode_text: EncodeText) -> list[np.ndarray]:
        flat = [c for cands in self.candidates for c in cands]
        emb = _unit(encode_text(flat))
        out, start = [], 0
        for cands in self.candidates:
            out.append(emb[start : start + len(cands)])
            start += len(cands)
        return out

    def score(self, image_embeds: np.ndarray, candidate_embeds: Sequence[np.ndarray]) -> dict[str, Any]:
        images = _unit(image_embeds)
        correct = [
            int(np.argmax(_unit(cands) @ img) == label)
            for img, cands, label in zip(images, candidate_embeds, self.labels)
        ]
        return {
            "task": self.name,
            "n": len(correct),
            "accuracy": float(np.mean(correct)) if correct else float("nan"),
            "chance": self.chance,
        }


@dataclass(eq=False)
class RetrievalTask:
    """Image <-> text retrieval. ``image_to_texts[i]`` lists the texts that describe image i;
    a text may describe several images (all count as hits)."""

    name: str
    samples: Sequence[Sample]
    texts: tuple[str, ...]
    image_to_texts: tuple[tuple[int, ...], ...]
    description: str = ""
    kind: str = field(default="retrieval", init=False)

    def score(self, image_embeds: np.ndarray, text_embeds: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
        return self.score_ranked(*self.ranked_hits(image_embeds, text_embeds), ks)

    def ranked_hits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query, whether each candidate in ranked order is a positive: ``[images, texts]``
        and ``[texts that describe an image, images]``. Column 0 is each query's R@1 outcome;
        paired between two models it gives the noise of an R@1 difference."""
        sim = _unit(image_embeds) @ _unit(text_embeds).T  # [N images, T texts]
        positive = np.zeros(sim.shape, dtype=bool)
        for i, texts in enumerate(self.image_to_texts):
            positive[i, list(texts)] = True
        i2t_order = np.argsort(-sim, axis=1, kind="stable")
        t2i_order = np.argsort(-sim.T, axis=1, kind="stable")
        i2t_hits = np.take_along_axis(positive, i2t_order, axis=1)
        t2i_hits = np.take_along_axis(positive.T, t2i_order, axis=1)
        return i2t_hits, t2i_hits[t2i_hits.any(axis=1)]

    def score_ranked(self, i2t_hits: np.ndarray, t2i_hits: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
        """Recall@K from :meth:`ranked_hits`."""
        out: dict[str, Any] = {"task": self.name, "n_images": i2t_hits.shape[0], "n_texts": i2t_hits.shape[1]}
        for k in ks:
            out[f"i2t_R@{k}"] = float(i2t_hits[:, :k].any(axis=1).mean())
            out[f"t2i_R@{k}"] = float(t2i_hits[:, :k].any(axis=1).mean())
        return out


@dataclass(eq=False)
class CaptionTask:
    """Generated captions vs references; with ``scenes``, also parsed against the scene
    (hallucinated objects and attributes, see ``score_captions``)."""

    name: str
    samples: Sequence[Sample]
    references: tuple[tuple[str, ...], ...]
    scenes: tuple[Scene, ...] | None = None
    description: str = ""
    kind: str = field(default="captioning", init=False)

    def score(self, predictions: Sequence[str]) -> dict[str, Any]:
        if len(predictions) != len(self.references):
            raise ValueError(f"{self.name}: {len(predictions)} predictions for {len(self.references)} samples")
        if self.scenes is not None:
            out = score_captions(predictions, self.scenes, self.references)
        else:
            exact = [normalize_caption(p) in {normalize_caption(r) for r in refs} for p, refs in zip(predictions, self.references)]
            out = {"n": len(exact), "exact_match": float(np.mean(exact)) if exact else float("nan")}
        return {"task": self.name, **out}


# ------------------------------------------------------------------ caption parsing


def normalize_caption(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


_SIZE_LOOKUP = {word: size for size, words in SIZE_WORDS.items() for word, _ in words}
_NOUNS = {"object", "shape", "thing"}
_COUNT_WORDS = {"one": 1, "single": 1, "two": 2, "three": 3}
_RELATION_PHRASES = sorted(
    ((tuple(word.split()), rel) for rel, words in RELATION_WORDS.items() for word, _ in words),
    key=lambda item: -len(item[0]),
)


@dataclass
class ParsedCaption:
    """Object mentions (dicts with any of size/color/shape), relations between mentions
    as ``(i, relation, j)``, and a stated object count."""

    mentions: list[dict[str, str]] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    count: int | None = None


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption in the synthetic grammar (tolerant of anything else: unknown words
    are ignored, a dangling attribute still counts as a mention)."""
    tokens = re.findall(r"[a-z]+", text.lower())
    out = ParsedCaption()
    current: dict[str, str] = {}
    pending: tuple[int, str] | None = None
    something = False

    def close() -> None:
        nonlocal current, pending, something
        out.mentions.append(current)
        if pending is not None and pending[0] >= 0:
            out.relations.append((pending[0], pending[1], len(out.mentions) - 1))
        current, pending, something = {}, None, False

    i = 0
    while i < len(tokens):
        phrase = next((p for p in _RELATION_PHRASES if tuple(tokens[i : i + len(p[0])]) == p[0]), None)
        if phrase is not None:
            if current:
                close()
            pending = (len(out.mentions) - 1, phrase[1])
            i += len(phrase[0])
            continue
        token = tokens[i]
        if token in _COUNT_WORDS and i + 1 < len(tokens) and tokens[i + 1].rstrip("s") in _NOUNS:
            out.count = _COUNT_WORDS[token]
            i += 2
            continue
        if token in _SIZE_LOOKUP:
            current["size"] = _SIZE_LOOKUP[token]
        elif token in COLORS:
            current["color"] = token
            if something:
                close()
        elif token in SHAPES:
            current["shape"] = token
            close()
        elif token in _NOUNS:
            if current:
                close()
        elif token == "something":
            something = True
        i += 1
    if current:
        close()
    return out


_ATTRIBUTES = ("size", "color", "shape")


def _assign(mentions: list[dict[str, str]], objects: Sequence[Any]) -> list[int | None]:
    """Mention -> object index (injective), maximising consistent mentions, then
    matching attributes."""
    n_m, n_o = len(mentions), len(objects)
    if not n_m or not n_o:
        return [None] * n_m
    agree = [[sum(m[a] == getattr(o, a) for a in m) for o in objects] for m in mentions]
    consistent = [[agree[i][j] == len(mentions[i]) for j in range(n_o)] for i in range(n_m)]
    best, best_key = None, None
    if n_m <= n_o:
        options = (list(p) for p in itertools.permutations(range(n_o), n_m))
    else:
        options = (
            [perm.index(i) if i in perm else None for i in range(n_m)]
            for perm in itertools.permutations(range(n_m), n_o)
        )
    for option in options:
        key = (
            sum(consistent[i][j] for i, j in enumerate(option) if j is not None),
            sum(agree[i][j] for i, j in enumerate(option) if j is not None),
        )
        if best_key is None or key > best_key:
            best, best_key = option, key
    return best


def score_caption(text: str, scene: Scene) -> dict[str, Any]:
    """Per-caption counts against the scene (see ``score_captions``)."""
    parsed = parse_caption(text)
    mentions = parsed.mentions[:8]  # a degenerate, repeating caption must not explode the search
    objects = scene.objects
    assignment = _assign(mentions, objects)
    out: dict[str, Any] = {"mentions": len(mentions), "hallucinated": 0, "recalled": 0}
    for a in _ATTRIBUTES:
        out[f"{a}_stated"] = out[f"{a}_correct"] = 0
    recalled = set()
    for mention, j in zip(mentions, assignment):
        if j is None:
            out["hallucinated"] += 1
            continue
        obj = objects[j]
        ok = all(mention[a] == getattr(obj, a) for a in mention)
        out["hallucinated"] += not ok
        for a in mention:
            out[f"{a}_stated"] += 1
            out[f"{a}_correct"] += mention[a] == getattr(obj, a)
        if ok and len(mention) == 3:
            recalled.add(j)
    out["recalled"] = len(recalled)
    out["count_correct"] = (parsed.count if parsed.count is not None else len(mentions)) == len(objects)
    out["relation_stated"] = out["relation_correct"] = 0
    if scene.relation is not None:
        for i, rel, k in parsed.relations:
            if i >= len(assignment) or k >= len(assignment):
                continue
            a, b = assignment[i], assignment[k]
            if a is None or b is None or a == b:
                continue
            truth = scene.relation if a == 0 else OPPOSITE[scene.relation]
            out["relation_stated"] += 1
            out["relation_correct"] += rel == truth
    return out


def score_captions(
    predictions: Sequence[str], scenes: Sequence[Scene], references: Sequence[Sequence[str]] | None = None,
    counts: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Aggregate caption quality on synthetic scenes.

    - ``exact_match``: the caption is one of the references (canonical descriptions);
    - ``hallucination_rate``: share of mentioned objects that match no distinct object
      of the scene in every attribute they state (``mention_precision`` = 1 - it);
    - ``object_recall``: share of scene objects named with all three attributes right;
    - ``<attribute>_accuracy``: among stated attributes of mentions matched to an object;
    - ``count_accuracy``: stated (or mentioned) object count equals the scene's;
    - ``relation_accuracy``: stated relations between two matched objects that are right.

    ``counts``: the captions' ``score_caption`` results when the caller already has them.
    """
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} predictions for {len(scenes)} scenes")
    if counts is not None and len(counts) != len(predictions):
        raise ValueError(f"{len(counts)} per-caption counts for {len(predictions)} predictions")
    refs = references if references is not None else [reference_captions(s) for s in scenes]
    per = list(counts) if counts is not None else [score_caption(p, s) for p, s in zip(predictions, scenes)]
    total = lambda key: sum(r[key] for r in per)  # noqa: E731
    ratio = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    exact = [normalize_caption(p) in {normalize_caption(r) for r in rs} for p, rs in zip(predictions, refs)]
    out = {
        "n": len(per),
        "exact_match": ratio(sum(exact), len(exact)),
        "mentions_per_caption": ratio(total("mentions"), len(per)),
        "hallucination_rate": ratio(total("hallucinated"), total("mentions")),
        "mention_precision": ratio(total("mentions") - total("hallucinated"), total("mentions")),
        "object_recall": ratio(total("recalled"), sum(s.n_objects for s in scenes)),
        "count_accuracy": ratio(total("count_correct"), len(per)),
        "relation_accuracy": ratio(total("relation_correct"), total("relation_stated")),
        "relations_stated": total("relation_stated"),
    }
    for a in _ATTRIBUTES:
        out[f"{a}_accuracy"] = ratio(total(f"{a}_correct"), total(f"{a}_stated"))
    return out


# ------------------------------------------------------------------ synthetic tasks


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_ZERO_SHOT = {
    # name: (classnames, prompt builder, description)
    "color": (tuple(COLORS), lambda c: (f"{_a(c)} object", f"{_a(c)} shape", f"something {c}", f"a picture of {_a(c)} object"), "colour of the object in one-object scenes"),
    "shape": (SHAPES, lambda s: (_a(s), f"a picture of {_a(s)}", f"an image of {_a(s)}", f"there is {_a(s)}"), "shape of the object in one-object scenes"),
    "size": (SIZES, lambda z: (f"{_a(z)} object", f"{_a(z)} shape", f"a picture of {_a(z)} thing"), "size of the object in one-object scenes"),
    "count": (("one", "two", "three"), lambda k: {"one": ("one object", "one shape", "a single object"), "two": ("two objects", "two shapes", "two things"), "three": ("three objects", "three shapes", "three things")}[k], "number of objects"),
}


def _np(obj: Any, color: str | None = None) -> str:
    return _a(f"{SIZE_WORDS[obj.size][0][0]} {color or obj.color} {obj.shape}")


def synthetic_tasks(
    split: str = "test",
    n: int = 500,
    *,
    seed: int = 0,
    config: SceneConfig | None = None,
    image_size: int | None = None,
    transform: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """The evaluation tasks on one split of synthetic-scenes, each with up to ``n``
    samples: the first samples of the split that the task applies to."""
    ds = SyntheticScenes(split, seed=seed, config=config, image_size=image_size, transform=transform)
    scenes: list[Scene] = []
    one: list[int] = []
    two: list[int] = []
    # scan only as far as every task's quota needs (binding takes ~70% of two-object scenes)
    while len(scenes) < len(ds) and (len(scenes) < n or len(one) < n or len(two) < 1.5 * n):
        scene = ds.scene(len(scenes))
        (one if scene.n_objects == 1 else two if scene.n_objects == 2 else []).append(len(scenes))
        scenes.append(scene)
    one = one[:n]
    tasks: dict[str, Any] = {}
    for name, (classnames, build, description) in _ZERO_SHOT.items():
        if name == "count":
            indices = list(range(min(n, len(scenes))))
            classnames = classnames[: len(ds.config.object_count_probs)]
            labels = [scenes[i].n_objects - 1 for i in indices]
        else:
            indices = one
            attribute = {"color": "color", "shape": "shape", "size": "size"}[name]
            labels = [classnames.index(getattr(scenes[i].objects[0], attribute)) for i in indices]
        tasks[name] = ZeroShotTask(
            name, tuple(classnames), tuple(build(c) for c in classnames), IndexedSamples(ds, indices), tuple(labels), description
        )
    rel_idx = two[:n]
    tasks["relation"] = ChoiceTask(
        "relation",
        IndexedSamples(ds, rel_idx),
        tuple(
            tuple(
                f"{_np(scenes[i].objects[0])} {RELATION_WORDS[r][0][0]} {_np(scenes[i].objects[1])}" for r in RELATIONS
            )
            for i in rel_idx
        ),
        tuple(RELATIONS.index(scenes[i].relation) for i in rel_idx),
        "where the first object is relative to the second (two-object scenes)",
    )
    bind_idx = [
        i for i in two
        if scenes[i].objects[0].color != scenes[i].objects[1].color
        and scenes[i].objects[0].shape != scenes[i].objects[1].shape
    ][:n]
    candidates, labels = [], []
    for k, i in enumerate(bind_idx):
        a, b = scenes[i].objects
        true = f"{_np(a)} and {_np(b)}"
        swapped = f"{_np(a, b.color)} and {_np(b, a.color)}"
        # alternate the position of the right answer so a constant model scores chance
        candidates.append((true, swapped) if k % 2 == 0 else (swapped, true))
        labels.append(k % 2)
    tasks["binding"] = ChoiceTask(
        "binding", IndexedSamples(ds, bind_idx), tuple(candidates), tuple(labels),
        "which object has which colour (two objects of different colours and shapes)",
    )
    first = list(range(min(n, len(scenes))))
    texts: list[str] = []
    text_index: dict[str, int] = {}
    image_to_texts = []
    for i in first:
        text = reference_captions(scenes[i])[0]
        if text not in text_index:
            text_index[text] = len(texts)
            texts.append(text)
        image_to_texts.append((text_index[text],))
    tasks["retrieval"] = RetrievalTask(
        "retrieval", IndexedSamples(ds, first), tuple(texts), tuple(image_to_texts),
        "image <-> canonical full description; identical descriptions are all hits",
    )
    tasks["captioning"] = CaptionTask(
        "captioning", IndexedSamples(ds, first), tuple(tuple(reference_captions(scenes[i])) for i in first),
        tuple(scenes[i] for i in first), "generated captions scored against the scene",
    )
    return tasks

