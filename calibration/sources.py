"""Calibration feeds per graph, built from any dataset the readers in ``coca_edge.data`` open.

Per graph the feeds are what that graph sees when the bundle runs:

- ``image_encoder``: images preprocessed with the bundle's own preprocess config;
- ``text_encoder``: the dataset's captions, tokenized with the bundle's tokenizer;
- ``cross_kv``: the FP32 image encoder's ``image_tokens`` for those images;
- ``decoder``: ``(input_ids, past_text, past_decoder, cross_k_i, cross_v_i)`` recorded while
  the runtime's own greedy loop (``coca_edge.runtime.generation.generate``) captions the
  calibration images with the FP32 graphs, so the cache activations the quantizer sees are
  those decoding produces (past lengths 0, 1, 2, ...), not random tensors.

Feeds are lists of ``dict[str, np.ndarray]`` keyed by graph input names; ``FeedReader``
wraps one list in ONNX Runtime's ``CalibrationDataReader`` contract.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["CalibrationError", "CalibrationData", "CalibrationSet", "FeedReader", "RecordingRunner",
           "open_dataset", "GRAPH_INPUTS"]

# What each graph's feeds are made of (documentation and error messages).
GRAPH_INPUTS = {
    "image_encoder": "preprocessed images",
    "text_encoder": "tokenized captions",
    "cross_kv": "image tokens from the FP32 image encoder",
    "decoder": "steps recorded from greedy generation on the FP32 graphs",
}


class CalibrationError(ValueError):
    """Calibration data is missing, empty or does not fit the bundle (names what was expected)."""


@dataclass(frozen=True)
class CalibrationData:
    """Where calibration samples come from and how many.

    ``dataset``: ``synthetic-scenes:SPLIT`` (embedded), a CSV/TSV of image paths and captions
    (open_clip's ``filepath``/``title`` columns), a COCO captions JSON, or an image folder
    (``root/<class>/<image>``). ``samples`` images/captions feed the encoders; the first
    ``decoder_images`` of them are captioned (``max_new_tokens`` greedy steps, batches of
    ``batch_size``) and ``decoder_steps`` steps per batch are kept, spread over the
    whole generation so past lengths from 0 to the longest appear.
    """

    dataset: str = "synthetic-scenes:train"
    samples: int = 256
    seed: int = 0
    batch_size: int = 8
    decoder_images: int = 32
    decoder_steps: int = 6
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise CalibrationError(f"dataset must be a non-empty string, got {self.dataset!r}")
        for name in ("samples", "batch_size", "decoder_images", "decoder_steps", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CalibrationError(f"calibration {name} must be an integer >= 1, got {value!r}")

    @classmethod
    def parse(cls, spec: "str | CalibrationData", samples: int | None = None, **kwargs: Any) -> "CalibrationData":
        if isinstance(spec, CalibrationData):
            return spec
        return cls(dataset=spec, **({"samples": samples} if samples is not None else {}), **kwargs)

    def key(self) -> dict[str, Any]:
        """Identity of the samples for cache keys (a file dataset adds its size and mtime)."""
        key: dict[str, Any] = asdict(self)
        path = Path(self.dataset)
        if path.exists():
            stat = path.stat()
            key["dataset"] = str(path.resolve())
            key["file"] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return key


def open_dataset(spec: str, image_size: int, seed: int = 0) -> Iterable[Any]:
    """A reader of ``Sample(image, caption)`` for a dataset spec (see ``CalibrationData``)."""
    from coca_edge.data import CocoCaptionsReader, CsvReader, DataError, ImageFolderReader, SyntheticScenes

    name, _, split = spec.partition(":")
    if name == "synthetic-scenes":
        # Rendered at the model's size: preprocessing then only normalises.
        return SyntheticScenes(split or "train", seed=seed, image_size=image_size)
    path = Path(spec)
    if not path.exists():
        raise CalibrationError(f"calibration dataset {spec!r}: not 'synthetic-scenes:SPLIT' and no such file or "
                               "folder (expected a CSV/TSV, a COCO captions JSON or an image folder)")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return ImageFolderReader(path)
        if suffix in (".csv", ".tsv"):
            return CsvReader(path, sep="," if suffix == ".csv" else "\t")
        if suffix == ".json":
            return CocoCaptionsReader(path, per_image=True)
    except DataError as err:
        raise CalibrationError(f"calibration dataset {spec}: {err}") from None
    raise CalibrationError(f"calibration dataset {spec}: unknown format (expected .csv, .tsv, .json or a folder)")


class FeedReader:
    """ONNX Runtime ``CalibrationDataReader`` over a list of feeds (rewindable, sized)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.all_feeds = list(feeds)
        self.feeds = self.all_feeds
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def __iter__(self):
        self.rewind()
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.all_feeds)

    def rewind(self) -> None:
        self.feeds = self.all_feeds
        self._next = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        # ORT's CalibStridedMinMax protocol: the next pass reads feeds[start:end].
        self.feeds = self.all_feeds[start_index:end_index]
        self._next = 0


@dataclass
class RecordingRunner:
    """Wraps a decoder ``Runner`` and keeps the feeds of the steps in ``keep`` (step numbers
    of one ``generate`` call); runs everything unchanged."""

    runner: Any
    keep: frozenset[int] = frozenset()
    records: list[dict[str, np.ndarray]] = field(default_factory=list)
    step: int = 0

    @property
    def input_names(self) -> list[str]:
        return self.runner.input_names

    @property
    def output_names(self) -> list[str]:
        return self.runner.output_names

    def start(self, keep: Iterable[int]) -> None:
        self.keep, self.step = frozenset(keep), 0

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if self.step in self.keep:
            # Views of the loop's arrays are enough: the loop never writes into a past it handed over.
            self.records.append(dict(feed))
        self.step += 1
        return self.runner.run(feed) if outputs is None else self.runner.run(feed, outputs)


class CalibrationSet:
    """Feeds per graph for one FP32 bundle, built lazily and once (a cache hit builds none).

    ``data`` is a ``CalibrationData`` (or its dataset spec string), or an array of images:
    uint8 ``[N, H, W, 3]`` (preprocessed here) or preprocessed float32 ``[N, 3, S, S]``.
    """

    def __init__(self, bundle_dir: str | os.PathLike, data: "CalibrationData | str | np.ndarray",
                 samples: int | None = None, progress: bool = False):
        from coca_edge.runtime.bundle import Bundle

        self.bundle = Bundle.load(bundle_dir, verify_hashes=False)
        self.image_size = int(self.bundle.config["model"]["vision"]["image_size"])
        self.progress = progress
        if isinstance(data, np.ndarray):
            self.array = self._check_array(data)
            self.data = CalibrationData(dataset="array", samples=len(self.array))
            self._digest = hashlib.sha256(np.ascontiguousarray(self.array).tobytes()).hexdigest()
        else:
            self.array = None
            self.data = CalibrationData.parse(data, samples)
            self._digest = None
        self._memo: dict[str, Any] = {}
        self.built: list[str] = []  # graphs whose feeds were built (tests: a cache hit builds nothing)

    def key(self) -> dict[str, Any]:
        key = self.data.key()
        if self._digest:
            key["array_sha256"] = self._digest
        return key

    def key_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    # -- inputs ------------------------------------------------------------------------
    def _check_array(self, array: np.ndarray) -> np.ndarray:
        s = self.image_size
        if len(array) == 0:
            raise CalibrationError("calibration set is empty: the image array has 0 images")
        if array.dtype == np.uint8:
            if array.ndim != 4 or array.shape[3] != 3:
                raise CalibrationError(f"uint8 calibration images must be [N, H, W, 3] RGB, got {list(array.shape)}")
            return self._preprocess(list(array))
        if array.dtype != np.float32 or array.shape[1:] != (3, s, s):
            raise CalibrationError(f"preprocessed calibration images must be float32 [N, 3, {s}, {s}] (this bundle's "
                                   f"image size), got {array.dtype} {list(array.shape)}")
        return array

    def _preprocess(self, images: list[Any]) -> np.ndarray:
        from coca_edge.data import PreprocessConfig, preprocess_batch

        return preprocess_batch(images, PreprocessConfig.from_dict(self.bundle.config["preprocess"]))

    def _samples(self) -> tuple[np.ndarray, list[str]]:
        if "samples" in self._memo:
            return self._memo["samples"]
        if self.array is not None:
            self._memo["samples"] = (self.array, [])
            return self._memo["samples"]
        reader = open_dataset(self.data.dataset, self.image_size, self.data.seed)
        images, captions = [], []
        for sample in _progress(reader, self.progress, "calibration samples", self.data.samples):
            img = sample.image
            images.append(img.convert("RGB") if hasattr(img, "convert") else img)
            if sample.caption:
                captions.append(sample.caption)
            if len(images) >= self.data.samples:
                break
        if not images:
            raise CalibrationError(f"calibration set is empty: {self.data.dataset} gave no images")
        self._memo["samples"] = (self._preprocess(images), captions)
        return self._memo["samples"]

    def _runtime(self):
        if "edge" not in self._memo:
            from coca_edge.runtime import EdgeCoCa

            self._memo["edge"] = EdgeCoCa.load(self.bundle.root, verify_hashes=False)
        return self._memo["edge"]

    # -- feeds per graph -------------------------------------------------------------------
    def feeds(self, graph: str) -> list[dict[str, np.ndarray]]:
        builders = {"image_encoder": self._image_feeds, "text_encoder": self._text_feeds,
                    "cross_kv": self._cross_feeds, "decoder": self._decoder_feeds}
        if graph not in builders:
            raise CalibrationError(f"no calibration feeds for graph {graph!r} (known: {', '.join(builders)})")
        if graph not in self._memo:
            self._memo[graph] = builders[graph]()
            self.built.append(graph)
        return self._memo[graph]

    def _batches(self, n: int) -> list[slice]:
        b = self.data.batch_size
        return [slice(i, min(i + b, n)) for i in range(0, n, b)]

    def _image_feeds(self) -> list[dict[str, np.ndarray]]:
        pixels, _ = self._samples()
        return [{"pixel_values": pixels[s]} for s in self._batches(len(pixels))]

    def _text_feeds(self) -> list[dict[str, np.ndarray]]:
        _, captions = self._samples()
        if not captions:
            raise CalibrationError(f"calibration set {self.data.dataset} has no captions: the text encoder needs "
                                   "captions (use a dataset with captions, e.g. synthetic-scenes:train or a CSV)")
        edge = self._runtime()
        ids = edge.tokenizer(captions, context_length=edge.layout.context_length)
        return [{"input_ids": ids[s]} for s in self._batches(len(ids))]

    def _cross_feeds(self) -> list[dict[str, np.ndarray]]:
        pixels, _ = self._samples()
        edge = self._runtime()
        return [{"image_tokens": edge.runners["image_encoder"].run({"pixel_values": pixels[s]})["image_tokens"]}
                for s in self._batches(len(pixels))]

    def _decoder_feeds(self) -> list[dict[str, np.ndarray]]:
        from coca_edge.runtime.generation import GenerationConfig, generate

        pixels, _ = self._samples()
        edge = self._runtime()
        config = GenerationConfig(strategy="greedy", max_new_tokens=self.data.max_new_tokens)
        recorder = RecordingRunner(edge.runners["decoder"])
        n = min(len(pixels), self.data.decoder_images)
        batches = self._batches(n)
        for k, s in enumerate(_progress(batches, self.progress, "decoder calibration (greedy generation)")):
            recorder.start(_spread(self.data.max_new_tokens, self.data.decoder_steps, offset=k))
            generate(recorder, edge.cross_kv(pixels[s]), edge.layout, config)
        return recorder.records


def _spread(steps: int, keep: int, offset: int = 0) -> list[int]:
    """``keep`` step numbers spread over ``steps``, shifted per batch so that together the
    batches cover more past lengths than any one does."""
    if keep >= steps:
        return list(range(steps))
    stride = steps / keep
    # Step 0 (empty past) always, then keep - 1 steps spread over the rest.
    return sorted({0} | {(int(i * stride) + offset) % steps for i in range(1, keep)})


def _progress(items: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)
