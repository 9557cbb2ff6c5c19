"""``synthetic-scenes``: an embedded, offline image-caption dataset with real learning signal.

Each sample is a small image (64 px by default) with 1-3 objects that vary in shape,
colour, size and position, on a noisy, shaded background with clutter lines, and a
caption from a small grammar with synonyms and spatial relations::

    a small red circle to the left of a big blue square
    there is a little green star
    something yellow
    three shapes, a large white cross, a small black diamond and a small orange circle

Sample ``i`` of a split is a pure function of ``(seed, split, i)``: random access, no
state, the same in every process. ``Scene`` records everything that was drawn (objects
with attributes and boxes, background, noise, clutter), so ``render_scene(scene)``
reproduces the image and later stages can score hallucinated objects and attributes.

The caption mix follows what small CoCa models learn in minutes on 2 CPU cores (see
docs/data.md): a share of one-object captions names a single attribute, so zero-shot
prompts naming one attribute have something to match; relations are only in two-object
captions and are evaluated as their own task.
"""
from __future__ import annotations

import functools
import io
import itertools
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .readers import Sample, SkipStats, _check_shard

__all__ = [
    "DATASET_NAME",
    "SHAPES",
    "COLORS",
    "SIZES",
    "RELATIONS",
    "SPLITS",
    "DEFAULT_SPLIT_SIZES",
    "SceneConfig",
    "SceneObject",
    "Background",
    "Scene",
    "SyntheticScenes",
    "sample_scene",
    "caption_scene",
    "reference_captions",
    "render_scene",
    "write_synthetic",
]

DATASET_NAME = "synthetic-scenes"
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (35, 80, 220),
    "purple": (140, 50, 190),
    "white": (248, 248, 248),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
RELATIONS = ("left", "right", "above", "below")
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_SIZES = {"train": 100_000, "val": 1_000, "test": 2_000}

# Bounding-box side as a fraction of the image side, per size class.
_DIAMETER = {"small": (0.17, 0.23), "large": (0.31, 0.39)}
_ANGLES = (-12, -8, -4, 0, 4, 8, 12)
_GAP = 2  # px between object boxes
_NOISE_BANK_SEED = 20_261_101

# Grammar: (word, weight). The first word of each list is the canonical one, used in
# reference captions and zero-shot prompts.
SIZE_WORDS = {"small": (("small", 3), ("little", 1)), "large": (("large", 3), ("big", 2))}
NOUN_WORDS = (("object", 2), ("shape", 2), ("thing", 1))
RELATION_WORDS = {
    "left": (("to the left of", 3), ("left of", 1)),
    "right": (("to the right of", 3), ("right of", 1)),
    "above": (("above", 3), ("over", 1)),
    "below": (("below", 3), ("under", 1)),
}
_FRAMES = (("", 12), ("a picture of ", 2), ("an image of ", 2), ("a photo of ", 1), ("there is ", 1))
_PLURAL_FRAMES = (("", 12), ("a picture of ", 2), ("an image with ", 2), ("there are ", 2))
_NUMBERS = ("one", "two", "three")


@dataclass(frozen=True)
class SceneConfig:
    """What scenes and captions look like. ``object_count_probs[k]`` is P(k+1 objects);
    ``single_attribute_share`` is the share of one-object captions that name a single
    attribute ("a red object", "a circle", "a small shape")."""

    image_size: int = 64
    object_count_probs: tuple[float, ...] = (0.45, 0.35, 0.20)
    single_attribute_share: float = 0.35
    noise_std: tuple[float, float] = (3.0, 12.0)
    max_clutter: int = 4
    color_jitter: int = 18

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        probs = tuple(float(p) for p in self.object_count_probs)
        if not 1 <= len(probs) <= 3 or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"object_count_probs must be 1-3 non-negative values summing to 1, got {probs}")
        object.__setattr__(self, "object_count_probs", probs)
        if not 0.0 <= self.single_attribute_share <= 0.8:
            raise ValueError(f"single_attribute_share must be in [0, 0.8], got {self.single_attribute_share}")
        lo, hi = (float(v) for v in self.noise_std)
        if not 0 <= lo <= hi:
            raise ValueError(f"noise_std must be (low, high) with 0 <= low <= high, got {self.noise_std}")
        object.__setattr__(self, "noise_std", (lo, hi))
        if self.max_clutter < 0 or not 0 <= self.color_jitter <= 60:
            raise ValueError("max_clutter must be >= 0 and color_jitter in [0, 60]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SceneConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown SceneConfig keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: int  # left of the bounding box, px
    y: int  # top of the bounding box, px
    diameter: int  # side of the square bounding box, px
    angle: int  # rotation in degrees
    rgb: tuple[int, int, int]  # colour as drawn (jittered)

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.diameter / 2, self.y + self.diameter / 2

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.diameter, self.y + self.diameter

    @property
    def attributes(self) -> tuple[str, str, str]:
        return self.size, self.color, self.shape

    def describe(self) -> str:
        """Canonical phrase without article: 'small red circle'."""
        return f"{SIZE_WORDS[self.size][0][0]} {self.color} {self.shape}"


@dataclass(frozen=True)
class Background:
    rgb: tuple[int, int, int]
    gradient: tuple[float, float]  # brightness change across the image, x and y
    noise_std: float
    noise_offset: tuple[int, int]  # into the fixed noise bank
    clutter: tuple[tuple[int, int, int, int, int, int, int, float], ...]  # x0,y0,x1,y1,r,g,b,alpha


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image. ``relation`` is where ``objects[0]`` is relative to
    ``objects[1]`` (two-object scenes only; placement makes it unambiguous)."""

    objects: tuple[SceneObject, ...]
    relation: str | None
    image_size: int
    background: Background

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        bg = data["background"]
        return cls(
            objects=tuple(
                SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in data["objects"]
            ),
            relation=data["relation"],
            image_size=data["image_size"],
            background=Background(
                rgb=tuple(bg["rgb"]),
                gradient=tuple(bg["gradient"]),
                noise_std=bg["noise_std"],
                noise_offset=tuple(bg["noise_offset"]),
                clutter=tuple(tuple(c) for c in bg["clutter"]),
            ),
        )


class _Draws:
    """Uniform draws from a numpy Generator, fetched in blocks: per-sample RNG cost is
    dominated by call overhead, not by the numbers."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._buf = rng.random(96).tolist()
        self._i = 0

    def u(self) -> float:
        if self._i == len(self._buf):
            self._buf = self._rng.random(96).tolist()
            self._i = 0
        self._i += 1
        return self._buf[self._i - 1]

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.u()

    def int(self, lo: int, hi: int) -> int:
        """Integer in [lo, hi] inclusive."""
        return lo + min(int(self.u() * (hi - lo + 1)), hi - lo)

    def fork(self) -> "_Draws":
        """An independent copy that yields the same draws as this one from here on."""
        bits = type(self._rng.bit_generator)()
        bits.state = self._rng.bit_generator.state
        twin = object.__new__(_Draws)
        # the buffer is replaced, never mutated, so both may share it
        twin._rng, twin._buf, twin._i = np.random.Generator(bits), self._buf, self._i
        return twin

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[min(int(self.u() * len(seq)), len(seq) - 1)]

    def weighted(self, pairs: Sequence[tuple[Any, float]]) -> Any:
        total = sum(w for _, w in pairs)
        r = self.u() * total
        for item, w in pairs:
            r -= w
            if r < 0:
                return item
        return pairs[-1][0]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def _separated(a: tuple[int, int, int], b: tuple[int, int, int]) -> tuple[bool, bool]:
    """(horizontally, vertically) separated by at least _GAP; boxes are (x, y, d)."""
    (ax, ay, ad), (bx, by, bd) = a, b
    horizontal = ax + ad + _GAP <= bx or bx + bd + _GAP <= ax
    vertical = ay + ad + _GAP <= by or by + bd + _GAP <= ay
    return horizontal, vertical


def _relation(a: tuple[int, int, int], b: tuple[int, int, int]) -> str | None:
    """Where box a is relative to box b, or None when not clearly one relation."""
    horizontal, vertical = _separated(a, b)
    if horizontal == vertical:
        return None
    (ax, ay, ad), (bx, by, bd) = a, b
    if horizontal:
        overlap = min(ay + ad, by + bd) - max(ay, by)
        if overlap < min(ad, bd) / 3:
            return None
        return "left" if ax < bx else "right"
    overlap = min(ax + ad, bx + bd) - max(ax, bx)
    if overlap < min(ad, bd) / 3:
        return None
    return "above" if ay < by else "below"


def _place(draws: _Draws, diameters: list[int], size: int, need_relation: bool):
    for _ in range(200):
        boxes: list[tuple[int, int, int]] = []
        for d in diameters:
            box = (draws.int(1, size - 1 - d), draws.int(1, size - 1 - d), d)
            if any(not any(_separated(box, other)) for other in boxes):
                break
            boxes.append(box)
        else:
            relation = _relation(boxes[0], boxes[1]) if need_relation else None
            if not need_relation or relation is not None:
                return boxes, relation
    return None


def sample_scene(draws: _Draws, cfg: SceneConfig) -> Scene:
    """Draw a scene: object count, distinct (size, colour, shape) triples, positions."""
    size = cfg.image_size
    n = 1 + draws.weighted(list(enumerate(cfg.object_count_probs)))
    while True:
        triples: list[tuple[str, str, str]] = []
        while len(triples) < n:
            triple = (draws.choice(SIZES), draws.choice(tuple(COLORS)), draws.choice(SHAPES))
            if triple not in triples:
                triples.append(triple)
        diameters = []
        for size_name, _, _ in triples:
            lo, hi = _DIAMETER[size_name]
            diameters.append(max(4, draws.int(round(lo * size), round(hi * size))))
        placed = _place(draws, diameters, size, need_relation=n == 2)
        if placed is not None:
            break
    boxes, relation = placed
    objects = []
    for (size_name, color, shape), (x, y, d) in zip(triples, boxes):
        jitter = cfg.color_jitter
        rgb = tuple(int(min(255, max(0, c + draws.int(-jitter, jitter)))) for c in COLORS[color])
        angle = 0 if shape == "circle" else draws.choice(_ANGLES)
        objects.append(SceneObject(shape, color, size_name, x, y, d, angle, rgb))
    level = draws.uniform(60, 190)
    bg_rgb = tuple(int(level + draws.uniform(-12, 12)) for _ in range(3))
    gradient = (round(draws.uniform(-30, 30), 2), round(draws.uniform(-30, 30), 2))
    bank = _noise_bank_size(size)
    offset = (draws.int(0, bank - size), draws.int(0, bank - size))
    clutter = []
    for _ in range(draws.int(0, cfg.max_clutter)):
        clutter.append(
            (
                draws.int(0, size - 1), draws.int(0, size - 1), draws.int(0, size - 1), draws.int(0, size - 1),
                draws.int(0, 255), draws.int(0, 255), draws.int(0, 255), round(draws.uniform(0.2, 0.5), 2),
            )
        )
    background = Background(
        bg_rgb, gradient, round(draws.uniform(*cfg.noise_std), 2), offset, tuple(clutter)
    )
    return Scene(tuple(objects), relation, size, background)


# ---------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(obj: SceneObject, draws: _Draws | None, attrs: Sequence[str] = ("size", "color", "shape")) -> str:
    """Noun phrase with article. draws=None gives the canonical wording."""
    words = []
    if "size" in attrs:
        options = SIZE_WORDS[obj.size]
        words.append(options[0][0] if draws is None else draws.weighted(options))
    if "color" in attrs:
        words.append(obj.color)
    if "shape" in attrs:
        words.append(obj.shape)
    else:
        words.append(NOUN_WORDS[0][0] if draws is None else draws.weighted(NOUN_WORDS))
    return f"{_article(words[0])} {' '.join(words)}"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _plural_noun(draws: _Draws) -> str:
    return draws.weighted(NOUN_WORDS) + "s"


def _one_object_caption(obj: SceneObject, draws: _Draws, cfg: SceneConfig) -> tuple[str, bool]:
    """(caption, framable)."""
    single = cfg.single_attribute_share
    style = draws.weighted((("full", 1.0 - single - 0.18), ("single", single), ("pair", 0.12), ("count", 0.06)))
    if style == "full":
        return _np(obj, draws), True
    if style == "single":
        attribute = draws.choice(("color", "shape", "size"))
        if attribute == "color" and draws.u() < 0.2:
            return f"something {obj.color}", True
        return _np(obj, draws, (attribute,)), True
    if style == "pair":
        return _np(obj, draws, draws.choice((("color", "shape"), ("size", "shape"), ("size", "color")))), True
    return draws.choice(("one", "a single")) + " " + draws.weighted(NOUN_WORDS), False


def caption_scene(scene: Scene, draws: _Draws, cfg: SceneConfig) -> str:
    """A training caption for a scene, drawn from the grammar."""
    objects = scene.objects
    n = len(objects)
    if n == 1:
        text, framable = _one_object_caption(objects[0], draws, cfg)
        return (draws.weighted(_FRAMES) if framable else "") + text
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates with our draws
        j = draws.int(0, i)
        order[i], order[j] = order[j], order[i]
    if n == 2:
        style = draws.weighted((("relation", 0.55), ("and", 0.25), ("count", 0.08), ("count_list", 0.12)))
    else:
        style = draws.weighted((("list", 0.70), ("count", 0.12), ("count_list", 0.18)))
    phrases = [_np(objects[i], draws) for i in order]
    if style == "relation":
        relation = scene.relation if order[0] == 0 else OPPOSITE[scene.relation]
        return draws.weighted(_FRAMES) + f"{phrases[0]} {draws.weighted(RELATION_WORDS[relation])} {phrases[1]}"
    if style in ("and", "list"):
        return draws.weighted(_FRAMES) + _join(phrases)
    count = f"{_NUMBERS[n - 1]} {_plural_noun(draws)}"
    if style == "count":
        return draws.weighted(_PLURAL_FRAMES) + count
    return f"{count}, {_join(phrases)}"


def reference_captions(scene: Scene) -> list[str]:
    """Canonical full descriptions (canonical words, no framing), every object order.

    Two objects are described with their relation, from either side; three as a list.
    """
    objects = scene.objects
    if len(objects) == 1:
        return [_np(objects[0], None)]
    if len(objects) == 2:
        a, b = _np(objects[0], None), _np(objects[1], None)
        rel = scene.relation
        return [
            f"{a} {RELATION_WORDS[rel][0][0]} {b}",
            f"{b} {RELATION_WORDS[OPPOSITE[rel]][0][0]} {a}",
        ]
    return [_join([_np(objects[i], None) for i in perm]) for perm in itertools.permutations(range(len(objects)))]


# ---------------------------------------------------------------------------- rendering


def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """Vertices in [-1, 1] coordinates (y down); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.86
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        r = 1.1
        pts = [(r * np.cos(a), r * np.sin(a)) for a in np.radians([-90, 30, 150])]
        return [(x, y + r / 4) for x, y in pts]
    if shape == "diamond":
        return [(0, -1), (0.78, 0), (0, 1), (-0.78, 0)]
    if shape == "cross":
        w = 0.3
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = np.radians(-90 + 36 * k)
            pts.append((r * np.cos(a), r * np.sin(a) + 0.1))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


_SUPERSAMPLE = 4


@functools.lru_cache(maxsize=4096)
def _mask(shape: str, diameter: int, angle: int) -> np.ndarray:
    """Anti-aliased coverage [d, d] float32 in [0, 1], cached per process."""
    big = diameter * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _polygon(shape)
    if poly is None:
        draw.ellipse((0, 0, big - 1, big - 1), fill=255)
    else:
        a = np.radians(angle)
        cos, sin = np.cos(a), np.sin(a)
        half = big / 2
        pts = [(half + half * (x * cos - y * sin), half + half * (x * sin + y * cos)) for x, y in poly]
        draw.polygon(pts, fill=255)
    mask = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255.0
    mask.setflags(write=False)
    return mask


def _noise_bank_size(image_size: int) -> int:
    return max(256, 2 * image_size)


@functools.lru_cache(maxsize=8)
def _noise_bank(bank_size: int) -> np.ndarray:
    """Fixed Gaussian noise [B, B] (one channel: luminance noise, like a sensor's)
    that scenes crop from; cropping is far cheaper than drawing fresh noise."""
    bank = np.random.default_rng(_NOISE_BANK_SEED).standard_normal((bank_size, bank_size), dtype=np.float32)
    bank.setflags(write=False)
    return bank


@functools.lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray]:
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return ramp[None, :], ramp[:, None]


@functools.lru_cache(maxsize=1024)
def _steps(n: int) -> np.ndarray:
    steps = np.linspace(0.0, 1.0, n, dtype=np.float32)
    steps.setflags(write=False)
    return steps


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 [H, W, 3] image of a scene."""
    size = scene.image_size
    bg = scene.background
    gx, gy = _grids(size)
    img = np.empty((size, size, 3), dtype=np.float32)
    np.add((gx * np.float32(bg.gradient[0]) + gy * np.float32(bg.gradient[1]))[:, :, None], bg.rgb, out=img)
    for x0, y0, x1, y1, r, g, b, alpha in bg.clutter:
        steps = _steps(max(abs(x1 - x0), abs(y1 - y0)) + 1)
        xs = (x0 + 0.5 + (x1 - x0) * steps).astype(np.intp)
        ys = (y0 + 0.5 + (y1 - y0) * steps).astype(np.intp)
        pixels = img[ys, xs]
        img[ys, xs] = pixels + np.float32(alpha) * (np.array((r, g, b), dtype=np.float32) - pixels)
    for obj in scene.objects:
        d = obj.diameter
        coverage = _mask(obj.shape, d, obj.angle)[:, :, None]
        region = img[obj.y : obj.y + d, obj.x : obj.x + d]
        region += coverage * (np.array(obj.rgb, dtype=np.float32) - region)
    oy, ox = bg.noise_offset
    noise = _noise_bank(_noise_bank_size(size))[oy : oy + size, ox : ox + size]
    img += (noise * np.float32(bg.noise_std))[:, :, None]
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


# ---------------------------------------------------------------------------- dataset


class SyntheticScenes:
    """One split of ``synthetic-scenes``: random access (``ds[i]``, ``ds.batch(idx)``)
    and iteration with the readers' ``shard``/``transform`` conventions.

    ``seed`` identifies the dataset (sample i is a function of seed, split, i);
    ``shuffle_seed`` only changes the iteration order. ``len(ds)`` is the split size.
    """

    name = DATASET_NAME

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        length: int | None = None,
        config: SceneConfig | None = None,
        image_size: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        shuffle_seed: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        config = config or SceneConfig()
        if image_size is not None and image_size != config.image_size:
            config = SceneConfig.from_dict({**config.to_dict(), "image_size": image_size})
        self.split, self.seed, self.config = split, int(seed), config
        self.length = DEFAULT_SPLIT_SIZES[split] if length is None else int(length)
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.transform = transform
        self.shuffle_seed = shuffle_seed
        self.shard = _check_shard(shard)
        self.epoch = 0
        self.skipped = SkipStats()  # always empty: generated samples cannot be bad

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def __len__(self) -> int:
        return self.length

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.length}")
        return index

    def _generate(self, index: int) -> tuple[Scene, str]:
        draws = _Draws(_rng(self.seed, self.split, self._check(index)))
        scene = sample_scene(draws, self.config)
        return scene, caption_scene(scene, draws, self.config)

    def scene(self, index: int) -> Scene:
        return self._generate(index)[0]

    def captioner(self, index: int) -> tuple[Scene, str, Callable[[Scene], str]]:
        """Sample ``index``'s scene, its caption, and a function that captions an edited copy
        of that scene with the same grammar draws (same frame, style, object order and
        synonyms), e.g. to build a negative caption that differs only where the scene does.

        The number of draws a caption takes depends only on the object count and the
        relation, never on attribute values, so edits must keep both."""
        draws = _Draws(_rng(self.seed, self.split, self._check(index)))
        scene = sample_scene(draws, self.config)
        after_scene = draws.fork()

        def recaption(edited: Scene) -> str:
            if edited.n_objects != scene.n_objects or edited.relation != scene.relation:
                raise ValueError("an edited scene must keep the object count and the relation")
            return caption_scene(edited, after_scene.fork(), self.config)

        return scene, recaption(scene), recaption

    def caption(self, index: int) -> str:
        return self._generate(index)[1]

    def pixels(self, index: int) -> np.ndarray:
        return render_scene(self.scene(index))

    def __getitem__(self, index: int) -> Sample:
        scene, caption = self._generate(index)
        img: Any = Image.fromarray(render_scene(scene))
        if self.transform is not None:
            img = self.transform(img)
        return Sample(img, caption, f"{DATASET_NAME}/{self.split}/{index}", {"scene": scene, "index": int(index), "split": self.split})

    def batch(self, indices: Sequence[int]) -> tuple[np.ndarray, list[str], list[Scene]]:
        """uint8 [N, H, W, 3] images, captions and scenes; normalise with
        ``preprocess_batch(images, cfg)``."""
        size = self.config.image_size
        images = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        captions, scenes = [], []
        for k, index in enumerate(indices):
            scene, caption = self._generate(index)
            images[k] = render_scene(scene)
            captions.append(caption)
            scenes.append(scene)
        return images, captions, scenes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Sample]:
        order = np.arange(self.length)
        if self.shuffle_seed is not None:
            order = np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(self.length)
        rank, world = self.shard
        stats = SkipStats()
        self.skipped = stats
        for index in order[rank::world]:
            stats.seen += 1
            stats.yielded += 1
            yield self[int(index)]

    def __repr__(self) -> str:
        return f"SyntheticScenes(split={self.split!r}, seed={self.seed}, length={self.length}, image_size={self.image_size})"


def write_synthetic(
    out_dir: str | os.PathLike[str],
    split: str = "train",
    n: int = 1000,
    *,
    fmt: str = "csv",
    seed: int = 0,
    config: SceneConfig | None = None,
    shard_size: int = 1000,
    image_format: str = "png",
) -> list[str]:
    """Write samples 0..n-1 of a split to disk, for open_clip-style pipelines.

    ``fmt='csv'``: ``images/<split>_<i>.png`` + ``<split>.csv`` (tab-separated,
    ``filepath``/``title``: open_clip's defaults) + ``<split>_scenes.jsonl``.
    ``fmt='wds'``: ``<split>-<k>.tar`` shards with ``<key>.png``, ``<key>.txt`` and
    ``<key>.json`` (caption + scene). Returns the files written (CSV or shards).
    """
    if fmt not in ("csv", "wds"):
        raise ValueError(f"fmt must be 'csv' or 'wds', got {fmt!r}")
    if image_format not in ("png", "jpg", "webp"):
        raise ValueError(f"image_format must be png, jpg or webp, got {image_format!r}")
    ds = SyntheticScenes(split, seed=seed, length=n, config=config)
    os.makedirs(out_dir, exist_ok=True)
    pil_format = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[image_format]
    save_args = {"quality": 95} if image_format != "png" else {}

    def encode(index: int) -> tuple[bytes, Scene, str]:
        scene, caption = ds._generate(index)
        buf = io.BytesIO()
        Image.fromarray(render_scene(scene)).save(buf, pil_format, **save_args)
        return buf.getvalue(), scene, caption

    written = []
    if fmt == "csv":
        image_dir = os.path.join(out_dir, "images")
        os.makedirs(image_dir, exist_ok=True)
        csv_path = os.path.join(out_dir, f"{split}.csv")
        with open(csv_path, "w", encoding="utf-8", newline="") as f_csv, open(
            os.path.join(out_dir, f"{split}_scenes.jsonl"), "w", encoding="utf-8"
        ) as f_scenes:
            f_csv.write("filepath\ttitle\n")
            for i in range(n):
                data, scene, caption = encode(i)
                rel = f"images/{split}_{i:06d}.{image_format}"
                with open(os.path.join(out_dir, rel), "wb") as f_img:
                    f_img.write(data)
                f_csv.write(f"{rel}\t{caption}\n")
                f_scenes.write(json.dumps({"filepath": rel, "caption": caption, "scene": scene.to_dict()}) + "\n")
        return [csv_path]
    mtime = 1_767_225_600  # 2026-01-01 UTC, fixed so shards are byte-identical per seed
    for start in range(0, n, shard_size):
        path = os.path.join(out_dir, f"{split}-{start // shard_size:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(n, start + shard_size)):
                data, scene, caption = encode(i)
                key = f"{split}_{i:06d}"
                record = json.dumps({"caption": caption, "scene": scene.to_dict()}).encode()
                for ext, payload in ((image_format, data), ("txt", caption.encode()), ("json", record)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(payload), mtime, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        written.append(path)
    return written
