"""Readers for image-caption data in the formats open_clip users already have.

Every reader is an iterable of ``Sample``; one pass is one ``for`` loop. Order is the
file's order, or a permutation fixed by ``seed`` (and ``set_epoch``). ``shard=(rank,
world)`` keeps every ``world``-th item of that order, so ``world`` processes with the
same seed see disjoint parts that add up to the whole.

Skip policy: a problem with one sample (missing or unreadable image, empty caption,
undecodable text) skips that sample and counts it by reason in ``reader.skipped``; the
counts are logged at the end of every pass. A structural problem (missing column, no
file matched, malformed annotation file, or a pass in which every sample was skipped)
raises ``DataError`` naming what is wrong.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np

from .preprocess import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "Sample",
    "SkipStats",
    "BaseReader",
    "CsvReader",
    "CocoCaptionsReader",
    "WebDatasetReader",
    "ImageFolderReader",
    "expand_urls",
]

log = logging.getLogger("coca_edge.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PathLike = Union[str, "os.PathLike[str]"]


class DataError(ValueError):
    """A structural problem with a dataset: nothing sensible can be read from it."""


@dataclass
class Sample:
    """One image with its caption. ``image`` is an RGB PIL image, or what the reader's
    ``transform`` made of it; ``meta`` holds format-specific extras (labels, all
    captions of a COCO image, a synthetic scene, the webdataset json)."""

    image: Any
    caption: str | None
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_tuple(self) -> tuple[Any, str | None]:
        return self.image, self.caption

    def as_dict(self) -> dict[str, Any]:
        return {"image": self.image, "caption": self.caption, "id": self.id, **self.meta}


class SkipStats:
    """Samples skipped in one pass, counted by reason, with a few examples of each."""

    max_examples = 3

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.seen = 0
        self.yielded = 0

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipStats") -> "SkipStats":
        """Add another pass's (e.g. another worker's) counts into this one."""
        self.counts.update(other.counts)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[: self.max_examples - len(mine)])
        self.seen += other.seen
        self.yielded += other.yielded
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "yielded": self.yielded,
            "skipped": self.total,
            "by_reason": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def summary(self) -> str:
        if not self.total:
            return f"{self.yielded} of {self.seen} samples yielded, none skipped"
        reasons = ", ".join(
            f"{reason}: {n} (e.g. {self.examples[reason][0]})" for reason, n in self.counts.most_common()
        )
        return f"{self.yielded} of {self.seen} samples yielded; skipped {self.total}: {reasons}"

    def __repr__(self) -> str:
        return f"SkipStats({self.summary()})"


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (rank, world), got {shard!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must satisfy 0 <= rank < world, got {shard!r}")
    return rank, world


class BaseReader:
    """Ordering, sharding, skip counting and transforms shared by all readers.

    Subclasses implement ``_items()`` (a list of raw items, cheap to build) and
    ``_load(item, stats)`` (a ``Sample`` or ``None`` after recording a skip).
    """

    name = "dataset"

    def __init__(
        self,
        *,
        transform: Callable[[Any], Any] | None = None,
        seed: int | None = None,
        shard: tuple[int, int] = (0, 1),
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        alpha_background: tuple[int, int, int] | None = None,
    ):
        self.transform = transform
        self.seed = seed
        self.shard = _check_shard(shard)
        self.max_pixels = max_pixels
        self.alpha_background = alpha_background
        self.epoch = 0
        self.skipped = SkipStats()

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffled order (with a seed) for the next pass."""
        self.epoch = int(epoch)

    def _order(self, n: int) -> np.ndarray:
        order = np.arange(n)
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        rank, world = self.shard
        return order[rank::world]

    def _items(self) -> Sequence[Any]:
        raise NotImplementedError

    def _load(self, item: Any, stats: SkipStats) -> Sample | None:
        raise NotImplementedError

    def _image(self, src: Any, sample_id: str, stats: SkipStats) -> Any:
        try:
            img = load_image(src, max_pixels=self.max_pixels, alpha_background=self.alpha_background)
        except ImageLoadError as exc:
            stats.add(exc.reason, f"{sample_id}: {exc}")
            return None
        return self.transform(img) if self.transform is not None else img

    def __len__(self) -> int:
        """Items in this shard before skips."""
        return len(self._order(len(self._items())))

    def __iter__(self) -> Iterator[Sample]:
        items = self._items()
        stats = SkipStats()
        self.skipped = stats
        for i in self._order(len(items)):
            stats.seen += 1
            sample = self._load(items[i], stats)
            if sample is not None:
                stats.yielded += 1
                yield sample
        self._finish(stats)

    def _finish(self, stats: SkipStats) -> None:
        if stats.total:
            log.warning("%s: %s", self.name, stats.summary())
        else:
            log.info("%s: %s", self.name, stats.summary())
        if stats.total and not stats.yielded:
            raise DataError(f"{self.name}: every sample was skipped ({stats.summary()})")


def _clean_caption(text: Any, sample_id: str, stats: SkipStats) -> str | None:
    if text is None:
        stats.add("no_caption", sample_id)
        return None
    if not isinstance(text, str):
        text = str(text)
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        stats.add("bad_encoding", f"{sample_id}: caption is not valid UTF-8")
        return None
    text = " ".join(text.split())
    if not text:
        stats.add("empty_caption", sample_id)
        return None
    return text


class CsvReader(BaseReader):
    """CSV/TSV of image paths and captions, with open_clip's conventions.

    ``img_key``, ``caption_key`` and ``sep`` default to open_clip's ``--csv-img-key
    filepath``, ``--csv-caption-key title`` and ``--csv-separator '\\t'``. Relative
    image paths are taken relative to the CSV file's folder (``root`` overrides; open_clip
    itself resolves them against the working directory). Rows with bytes that are not
    valid in ``encoding`` are skipped and counted.
    """

    def __init__(
        self,
        path: PathLike,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
        *,
        root: PathLike | None = None,
        encoding: str = "utf-8",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.root = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(self.path))
        self.img_key, self.caption_key, self.sep = img_key, caption_key, sep
        if not os.path.isfile(self.path):
            raise DataError(f"CSV file {self.path} does not exist")
        # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is
        # skipped instead of failing the whole file.
        with open(self.path, encoding=encoding, errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=sep)
            header = next(reader, None)
            if header is None:
                raise DataError(f"CSV file {self.path} is empty")
            header = [h.strip() for h in header]
            missing = [k for k in (img_key, caption_key) if k not in header]
            if missing:
                hint = ""
                if len(header) == 1 and any(s in header[0] for s in (",", "\t", ";", "|")):
                    hint = f" (one column only: is the separator {sep!r} right?)"
                raise DataError(
                    f"CSV file {self.path} has no column {', '.join(map(repr, missing))}; "
                    f"its columns are {header}{hint}"
                )
            img_col, cap_col = header.index(img_key), header.index(caption_key)
            self._rows = [
                (
                    reader.line_num,
                    row[img_col] if img_col < len(row) else None,
                    row[cap_col] if cap_col < len(row) else None,
                )
                for row in reader
                if row
            ]

    def _items(self) -> Sequence[Any]:
        return self._rows

    def _load(self, item: Any, stats: SkipStats) -> Sample | None:
        line, rel_path, caption = item
        sample_id = f"{self.name}:{line}"
        if rel_path is None or not rel_path.strip():
            stats.add("no_image_path", sample_id)
            return None
        if any("\udc80" <= ch <= "\udcff" for ch in rel_path):
            stats.add("bad_encoding", f"{sample_id}: image path is not valid UTF-8")
            return None
        caption = _clean_caption(caption, sample_id, stats)
        if caption is None:
            return None
        path = os.path.join(self.root, rel_path.strip())
        image = self._image(path, sample_id, stats)
        if image is None:
            return None
        return Sample(image, caption, sample_id, {"path": path})


_COCO_SPLIT = re.compile(r"captions_(.+)\.json$")


class CocoCaptionsReader(BaseReader):
    """COCO captions (``captions_*.json`` + image folder).

    One sample per caption by default (what training wants); with ``per_image=True``
    one sample per image, ``caption`` its first caption and ``meta['captions']`` all of
    them (what retrieval and captioning evaluation want). Without ``image_dir`` the
    folder is guessed from the file name: ``captions_val2017.json`` -> ``val2017/``
    beside the file or beside its folder.
    """

    def __init__(
        self,
        annotation_file: PathLike,
        image_dir: PathLike | None = None,
        *,
        per_image: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.path = os.fspath(annotation_file)
        self.name = os.path.basename(self.path)
        self.per_image = per_image
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise DataError(f"COCO annotation file {self.path} does not exist") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"COCO annotation file {self.path} is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list
        ):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DataError(f"{self.path} is not COCO captions JSON: needs 'images' and 'annotations' lists, has {keys}")
        self.image_dir = self._find_image_dir(image_dir)
        files: dict[Any, str] = {}
        for img in data["images"]:
            if isinstance(img, dict) and "id" in img and "file_name" in img:
                files[img["id"]] = img["file_name"]
        self._orphans: list[tuple[Any, Any]] = []
        by_image: dict[Any, list[tuple[Any, Any]]] = {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict):
                continue
            image_id = ann.get("image_id")
            entry = (ann.get("id"), ann.get("caption"))
            if image_id in files:
                by_image.setdefault(image_id, []).append(entry)
            else:
                self._orphans.append((image_id, entry[0]))
        if per_image:
            self._entries = [(image_id, files[image_id], by_image.get(image_id, [])) for image_id in files]
        else:
            self._entries = [
                (image_id, files[image_id], [entry]) for image_id in files for entry in by_image.get(image_id, [])
            ]
        if not self._entries:
            raise DataError(f"{self.path} has no captioned images")

    def _find_image_dir(self, image_dir: PathLike | None) -> str:
        if image_dir is not None:
            image_dir = os.fspath(image_dir)
            if not os.path.isdir(image_dir):
                raise DataError(f"COCO image folder {image_dir} does not exist")
            return image_dir
        here = os.path.dirname(os.path.abspath(self.path))
        match = _COCO_SPLIT.search(os.path.basename(self.path))
        candidates = [os.path.join(here, match.group(1)), os.path.join(os.path.dirname(here), match.group(1))] if match else []
        return next((c for c in candidates if os.path.isdir(c)), here)

    def _items(self) -> Sequence[Any]:
        return self._entries

    def _finish(self, stats: SkipStats) -> None:
        rank, world = self.shard
        for image_id, ann_id in self._orphans[rank::world]:
            stats.add("unknown_image_id", f"annotation {ann_id} -> image_id {image_id}")
        super()._finish(stats)

    def _load(self, item: Any, stats: SkipStats) -> Sample | None:
        image_id, file_name, entries = item
        captions = []
        for ann_id, caption in entries:
            caption = _clean_caption(caption, f"{self.name}:annotation {ann_id}", stats)
            if caption is not None:
                captions.append((ann_id, caption))
        if not captions:
            if not entries:
                stats.add("no_caption", f"{self.name}:image {image_id}")
            return None
        sample_id = f"{image_id}" if self.per_image else f"{image_id}:{captions[0][0]}"
        image = self._image(os.path.join(self.image_dir, file_name), f"{self.name}:image {image_id}", stats)
        if image is None:
            return None
        meta = {"image_id": image_id, "file_name": file_name}
        if self.per_image:
            meta["captions"] = [c for _, c in captions]
        else:
            meta["annotation_id"] = captions[0][0]
        return Sample(image, captions[0][1], sample_id, meta)


def expand_urls(urls: Union[str, Sequence[str]]) -> list[str]:
    """Expand webdataset shard specs: brace ranges ``{00000..00099}``, ``::``-separated
    lists, and (for local paths) glob patterns."""
    from braceexpand import braceexpand  # webdataset's own dependency

    specs = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for spec in specs:
        for part in spec.split("::"):
            for url in braceexpand(part):
                if "://" not in url and not url.startswith("pipe:") and glob.has_magic(url):
                    out.extend(sorted(glob.glob(url)))
                else:
                    out.append(url)
    return out


_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_WDS_CAPTION_KEYS = ("txt", "json")


class WebDatasetReader(BaseReader):
    """webdataset tar shards, read through the ``webdataset`` package.

    Each sample is the tar members sharing a key: an image (first of ``image_keys``)
    and a caption (``txt``, or a ``json`` with a ``caption``/``text`` field; the parsed
    json is ``meta['json']``). With at least as many shards as ``world`` the shards are
    split between ranks; with fewer, every rank reads every shard and keeps every
    ``world``-th sample. ``shuffle_buffer`` > 0 additionally shuffles samples in a
    buffer, seeded. Local shards named but absent are a ``DataError``.

    ``webdataset`` imports torch, so it is imported only when a pass starts.
    """

    def __init__(
        self,
        urls: Union[str, Sequence[str]],
        *,
        image_keys: Sequence[str] = _WDS_IMAGE_KEYS,
        caption_keys: Sequence[str] = _WDS_CAPTION_KEYS,
        shuffle_buffer: int = 0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.urls = expand_urls(urls)
        self.name = f"webdataset({urls if isinstance(urls, str) else len(self.urls)})"
        if not self.urls:
            raise DataError(f"no webdataset shard matched {urls!r}")
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self.urls)} webdataset shards do not exist, e.g. {missing[:3]}"
            )
        self.image_keys = tuple(k.lower() for k in image_keys)
        self.caption_keys = tuple(k.lower() for k in caption_keys)
        self.shuffle_buffer = int(shuffle_buffer)

    def _shards(self) -> tuple[list[str], int, int]:
        """This rank's shards, and (stride, offset) of the sample-level split."""
        rank, world = self.shard
        urls = list(self.urls)
        if self.seed is not None:
            urls = [urls[i] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(urls))]
        if len(urls) >= world:
            return urls[rank::world], 1, 0
        return urls, world, rank

    def __len__(self) -> int:
        raise TypeError("a webdataset has no length without reading it")

    def __iter__(self) -> Iterator[Sample]:
        from webdataset import tariterators

        stats = SkipStats()
        self.skipped = stats
        shards, stride, offset = self._shards()

        def handler(exc: Exception) -> bool:
            stats.add("bad_shard_member", f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")
            return True

        raw = tariterators.tarfile_samples([{"url": u} for u in shards], handler=handler)
        samples = (s for k, s in enumerate(raw) if k % stride == offset)
        for sample in self._shuffled(samples):
            stats.seen += 1
            loaded = self._decode(sample, stats)
            if loaded is not None:
                stats.yielded += 1
                yield loaded
        self._finish(stats)

    def _shuffled(self, samples: Iterable[dict]) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rank = self.shard[0]
        rng = np.random.default_rng([self.seed if self.seed is not None else 0, self.epoch, rank])
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, raw: dict, stats: SkipStats) -> Sample | None:
        sample_id = f"{os.path.basename(str(raw.get('__url__', '')))}:{raw.get('__key__')}"
        image_key = next((k for k in self.image_keys if k in raw), None)
        if image_key is None:
            stats.add("no_image", f"{sample_id}: members {sorted(k for k in raw if not k.startswith('__'))}")
            return None
        meta: dict[str, Any] = {"key": raw.get("__key__"), "url": raw.get("__url__")}
        caption: Any = None
        for key in self.caption_keys:
            if key not in raw:
                continue
            try:
                text = raw[key].decode("utf-8")
            except UnicodeDecodeError:
                stats.add("bad_encoding", f"{sample_id}.{key} is not valid UTF-8")
                return None
            if key == "json":
                try:
                    meta["json"] = parsed = json.loads(text)
                except json.JSONDecodeError as exc:
                    stats.add("bad_json", f"{sample_id}.json: {exc}")
                    return None
                if caption is None and isinstance(parsed, dict):
                    caption = parsed.get("caption", parsed.get("text"))
            elif caption is None:
                caption = text
        caption = _clean_caption(caption, sample_id, stats)
        if caption is None:
            return None
        image = self._image(raw[image_key], sample_id, stats)
        if image is None:
            return None
        return Sample(image, caption, sample_id, meta)


class ImageFolderReader(BaseReader):
    """``root/<class>/<image>`` folders for zero-shot classification.

    Classes are the sub-folders in sorted order (label = position). ``classnames``
    renames them for prompts: a list in that order, or a ``{folder: name}`` dict.
    ``caption`` is the first template filled with the class name; ``meta`` has
    ``label`` and ``classname``.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        classnames: Sequence[str] | dict[str, str] | None = None,
        templates: Sequence[str] = ("a photo of a {}.",),
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = os.fspath(root)
        self.name = os.path.basename(os.path.normpath(self.root))
        if not os.path.isdir(self.root):
            raise DataError(f"image folder {self.root} does not exist")
        self.classes = sorted(d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise DataError(f"image folder {self.root} has no class sub-folders")
        if classnames is None:
            self.classnames = [c.replace("_", " ") for c in self.classes]
        elif isinstance(classnames, dict):
            unnamed = [c for c in self.classes if c not in classnames]
            if unnamed:
                raise DataError(f"classnames has no name for folders {unnamed}")
            self.classnames = [classnames[c] for c in self.classes]
        else:
            if len(classnames) != len(self.classes):
                raise DataError(f"{len(classnames)} classnames for {len(self.classes)} class folders {self.classes}")
            self.classnames = list(classnames)
        self.templates = tuple(templates)
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"templates must each contain '{{}}', got {self.templates!r}")
        extensions = tuple(e.lower() for e in extensions)
        self._files: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, cls)):
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.lower().endswith(extensions):
                        self._files.append((os.path.join(dirpath, fname), label))
        if not self._files:
            raise DataError(f"no images with extensions {extensions} under {self.root}")

    def prompts(self) -> list[list[str]]:
        """Per class, every template filled with its name."""
        return [[t.format(name) for t in self.templates] for name in self.classnames]

    def labels(self) -> list[int]:
        return [label for _, label in self._files]

    def _items(self) -> Sequence[Any]:
        return self._files

    def _load(self, item: Any, stats: SkipStats) -> Sample | None:
        path, label = item
        sample_id = os.path.relpath(path, self.root)
        image = self._image(path, sample_id, stats)
        if image is None:
            return None
        name = self.classnames[label]
        return Sample(image, self.templates[0].format(name), sample_id, {"label": label, "classname": name, "path": path})
