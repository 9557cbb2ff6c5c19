"""Faithfulness levers: hard-negative captions (``loss.hard_negative``) and the filter of
hallucinated teacher captions for sequence-level KD (``teacher.filter_hallucinated``).

Hard negatives (NegCLIP, Yuksekgonul et al. 2023) are captions that differ from the
positive in one attribute binding. On ``synthetic-scenes`` they are generated from the
sample's :class:`~coca_edge.data.Scene`: a copy of the scene is edited (two objects swap
their colour or size; otherwise one object gets another colour, size or shape) and
re-captioned with the positive's own grammar draws, so the wording is the positive's except
for the edited attribute words; an edit is kept only if it changes the caption and the
result is judged hallucinated against the real scene (``score_caption``), which rules out
swaps that merely re-order two otherwise identical objects. On user data (CSV) a fixed word
rule applies (:func:`word_swap_negative`); a caption it cannot change gets no negative.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.synthetic import COLORS, SHAPES, SIZES, SPLITS, Scene, SceneObject, SyntheticScenes
from ..data.tasks import score_caption
from ..tokenizer import Tokenizer

__all__ = ["HardNegative", "scene_negative", "synthetic_negative", "word_swap_negative", "COLOR_WORDS",
           "SIZE_CLASSES", "SIZE_ANTONYMS", "hallucinated"]

# Colour words the CSV rule recognises and substitutes (one word per colour, no synonyms, so
# a substitution always names a different colour).
COLOR_WORDS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
SIZE_CLASSES = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
# Replacement for a caption with size words of one class only.
SIZE_ANTONYMS = {"small": "large", "little": "big", "tiny": "huge", "large": "small", "big": "little", "huge": "tiny"}

_SWAPPED = ("color", "size")  # attributes two objects of a scene exchange
_VALUES = {"color": tuple(COLORS), "size": SIZES, "shape": SHAPES}
# RNG stream of the negative's choices, apart from the scene's own draws.
_NEGATIVE_STREAM = 15


@dataclass(frozen=True)
class HardNegative:
    """A negative caption and the edited scene it describes truthfully."""

    caption: str
    scene: Scene
    kind: str  # "swap" (two objects exchange ``attribute``) or "change" (one object gets another value)
    attribute: str  # "color", "size" or "shape"
    objects: tuple[int, ...]  # indices of the edited objects


def _with(obj: SceneObject, attribute: str, value: str, rgb: tuple[int, int, int] | None = None) -> SceneObject:
    changes: dict = {attribute: value}
    if attribute == "color":
        changes["rgb"] = rgb if rgb is not None else COLORS[value]
    return dataclasses.replace(obj, **changes)


def _edits(scene: Scene, rng: np.random.Generator):
    """Candidate ``(kind, attribute, objects, edited scene)``: swaps first (binding), then changes."""
    objs = scene.objects
    if len(objs) == 2:
        a, b = objs
        for k in rng.permutation(len(_SWAPPED)):
            attr = _SWAPPED[int(k)]
            if getattr(a, attr) != getattr(b, attr):
                edited = (_with(a, attr, getattr(b, attr), b.rgb), _with(b, attr, getattr(a, attr), a.rgb))
                yield "swap", attr, (0, 1), dataclasses.replace(scene, objects=edited)
    triples = {o.attributes for o in objs}
    attrs = tuple(_VALUES)
    for k in rng.permutation(len(attrs)):
        attr = attrs[int(k)]
        for j in rng.permutation(len(objs)):
            j = int(j)
            obj = objs[j]
            values = [v for v in _VALUES[attr] if v != getattr(obj, attr)
                      and _with(obj, attr, v).attributes not in triples]  # no duplicate object
            if values:
                new = _with(obj, attr, values[int(rng.integers(len(values)))])
                yield "change", attr, (j,), dataclasses.replace(scene, objects=objs[:j] + (new,) + objs[j + 1:])


def scene_negative(scene: Scene, caption: str, recaption: Callable[[Scene], str],
                   rng: np.random.Generator) -> HardNegative | None:
    """The first candidate edit whose caption differs from ``caption`` and is hallucinated
    for ``scene`` (see the module docstring); None when the caption names no attribute
    any edit can change (e.g. "two shapes")."""
    for kind, attribute, objects, edited in _edits(scene, rng):
        text = recaption(edited)
        if text != caption and score_caption(text, scene)["hallucinated"] > 0:
            return HardNegative(text, edited, kind, attribute, objects)
    return None


def synthetic_negative(ds: SyntheticScenes, index: int) -> HardNegative | None:
    """Sample ``index``'s hard negative: a pure function of ``(seed, split, index)``."""
    scene, caption, recaption = ds.captioner(index)
    rng = np.random.default_rng([ds.seed, SPLITS.index(ds.split), int(index), _NEGATIVE_STREAM])
    return scene_negative(scene, caption, recaption, rng)


def _recase(like: str, word: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word.capitalize() if like[:1].isupper() else word


def _pattern(words: Sequence[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(words) + r")\b", re.IGNORECASE)


_COLOR_RE = _pattern(COLOR_WORDS)
_SIZE_RE = _pattern(SIZE_ANTONYMS)
_SIZE_CLASS = {w: c for c, words in SIZE_CLASSES.items() for w in words}


def _substitute(caption: str, pattern: re.Pattern, mapping: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        word = m.group(0)
        return _recase(word, mapping[word.lower()]) if word.lower() in mapping else word

    return pattern.sub(sub, caption)


def word_swap_negative(caption: str) -> str | None:
    """The rule-based negative of a free-text caption (user data), or None.

    Colour words (``COLOR_WORDS``) first: with two different ones, the first two swap
    everywhere ("a red car and a blue door" -> "a blue car and a red door"); with one, it is
    replaced everywhere by another colour from the list, picked by a CRC of the caption
    (deterministic). Otherwise size words (``SIZE_CLASSES``): a small-class and a
    large-class word swap; words of one class only become their ``SIZE_ANTONYMS``.
    Case is kept ("Red" -> "Blue")."""
    colors = list(dict.fromkeys(m.group(0).lower() for m in _COLOR_RE.finditer(caption)))
    if len(colors) >= 2:
        return _substitute(caption, _COLOR_RE, {colors[0]: colors[1], colors[1]: colors[0]})
    if colors:
        others = [c for c in COLOR_WORDS if c != colors[0]]
        return _substitute(caption, _COLOR_RE, {colors[0]: others[zlib.crc32(caption.encode()) % len(others)]})
    sizes = list(dict.fromkeys(m.group(0).lower() for m in _SIZE_RE.finditer(caption)))
    if not sizes:
        return None
    small = next((w for w in sizes if _SIZE_CLASS[w] == "small"), None)
    large = next((w for w in sizes if _SIZE_CLASS[w] == "large"), None)
    if small is not None and large is not None:
        return _substitute(caption, _SIZE_RE, {small: large, large: small})
    return _substitute(caption, _SIZE_RE, {w: SIZE_ANTONYMS[w] for w in sizes})


def hallucinated(captions: torch.Tensor, scenes: Sequence[Scene], tokenizer: Tokenizer) -> torch.Tensor:
    """bool ``[B]``: the token captions (start token, text, end token, pads) that name an
    object or attribute the scene does not have, by the evaluation's per-caption judgement
    (``score_caption``'s hallucinated mentions, as in ``hallucination_rate``)."""
    if len(scenes) != captions.shape[0]:
        raise ValueError(f"{captions.shape[0]} captions for {len(scenes)} scenes")
    flags = [score_caption(tokenizer.decode(row.tolist()), scene)["hallucinated"] > 0
             for row, scene in zip(captions.cpu(), scenes)]
    return torch.tensor(flags, dtype=torch.bool)
