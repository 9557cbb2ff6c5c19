"""Evaluation data: the images (preprocessed once), texts and tasks every model is run on.

``synthetic-scenes[:split]`` brings all its tasks (zero-shot, choice, retrieval, captioning
with scenes for hallucination). A CSV/TSV, COCO captions JSON or image folder goes through
the data package's readers; tasks that need what the data lacks (labels, captions, scenes)
are skipped with a note, never scored on nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data import (CaptionTask, ChoiceTask, CocoCaptionsReader, CsvReader, DataError, ImageFolderReader,
                    PreprocessConfig, RetrievalTask, ZeroShotTask, normalize, preprocess, synthetic_tasks)
from ..data.synthetic import SPLITS

__all__ = ["EvalData", "BoundTask", "load_eval_data", "DATA_HELP"]

DATA_HELP = ("synthetic-scenes[:train|val|test], csv:FILE / FILE.csv / FILE.tsv (columns filepath, title), "
             "coco:FILE / captions_*.json, folder:DIR / DIR (one sub-folder per class)")


@dataclass
class BoundTask:
    """A data-package task and the rows of ``EvalData.pixels`` holding its images."""

    task: Any
    rows: np.ndarray


@dataclass
class EvalData:
    source: str
    pixels: np.ndarray  # float32 [N, 3, S, S], preprocessed for the reference
    zero_shot: dict[str, BoundTask] = field(default_factory=dict)
    choice: dict[str, BoundTask] = field(default_factory=dict)
    retrieval: BoundTask | None = None
    captioning: BoundTask | None = None
    notes: list[str] = field(default_factory=list)
    preprocess: PreprocessConfig | None = None

    @property
    def texts(self) -> list[str]:
        """Every text any task embeds, each once, in a stable order."""
        seen: dict[str, None] = {}
        for bound in self.zero_shot.values():
            for prompts in bound.task.prompts:
                seen.update(dict.fromkeys(prompts))
        for bound in self.choice.values():
            for cands in bound.task.candidates:
                seen.update(dict.fromkeys(cands))
        if self.retrieval is not None:
            seen.update(dict.fromkeys(self.retrieval.task.texts))
        return list(seen)

    def display_images(self, rows: Sequence[int]) -> np.ndarray:
        """uint8 ``[n, S, S, 3]`` images for reports (the preprocessed pixels, un-normalised)."""
        cfg = self.preprocess
        mean = np.asarray(cfg.mean, np.float32)[:, None, None]
        std = np.asarray(cfg.std, np.float32)[:, None, None]
        px = self.pixels[list(rows)] * std + mean
        return np.clip(px * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _kind(spec: str) -> tuple[str, str]:
    for prefix in ("synthetic-scenes", "csv:", "coco:", "folder:"):
        if spec.startswith(prefix):
            if prefix == "synthetic-scenes":
                rest = spec[len(prefix):]
                if rest and not rest.startswith(":"):
                    break
                return "synthetic", rest[1:] or "val"
            return prefix[:-1], spec[len(prefix):]
    lower = spec.lower()
    if lower.endswith((".csv", ".tsv")):
        return "csv", spec
    if lower.endswith(".json"):
        return "coco", spec
    if os.path.isdir(spec):
        return "folder", spec
    raise DataError(f"--data {spec!r}: not a known data source; expected {DATA_HELP}")


def load_eval_data(spec: str, samples: int, preprocess_config: PreprocessConfig, seed: int = 0) -> EvalData:
    """Load up to ``samples`` samples per task from ``spec`` (see ``DATA_HELP``)."""
    if not isinstance(samples, int) or samples < 1:
        raise DataError(f"samples must be an integer >= 1, got {samples!r}")
    kind, arg = _kind(str(spec))
    if kind == "synthetic":
        return _synthetic(spec, arg, samples, preprocess_config, seed)
    if kind == "csv":
        sep = "," if arg.lower().endswith(".csv") else "\t"
        reader = CsvReader(arg, sep=sep)
    elif kind == "coco":
        reader = CocoCaptionsReader(arg, per_image=True)
    else:
        reader = ImageFolderReader(arg)
    return _from_reader(spec, reader, samples, preprocess_config)


def _synthetic(spec: str, split: str, samples: int, cfg: PreprocessConfig, seed: int) -> EvalData:
    if split not in SPLITS:
        raise DataError(f"--data {spec!r}: unknown synthetic-scenes split {split!r}; splits are {', '.join(SPLITS)}")
    size = cfg.size_hw[0]
    tasks = synthetic_tasks(split, samples, seed=seed, image_size=size)
    union = sorted({i for t in tasks.values() for i in t.samples.indices})
    if not union:
        raise DataError(f"--data {spec!r}: no samples")
    dataset = next(iter(tasks.values())).samples.dataset
    images, _, _ = dataset.batch(union)
    pixels = normalize(images, cfg).astype(np.float32)
    where = {index: row for row, index in enumerate(union)}

    def bind(task: Any) -> BoundTask:
        return BoundTask(task, np.asarray([where[i] for i in task.samples.indices], dtype=np.int64))

    data = EvalData(spec, pixels, preprocess=cfg)
    for name, task in tasks.items():
        if not len(task.samples):
            data.notes.append(f"task {name}: no samples in the first scenes of {split}; skipped")
            continue
        if isinstance(task, ZeroShotTask):
            data.zero_shot[name] = bind(task)
        elif isinstance(task, ChoiceTask):
            data.choice[name] = bind(task)
        elif isinstance(task, RetrievalTask):
            data.retrieval = bind(task)
        elif isinstance(task, CaptionTask):
            data.captioning = bind(task)
    return data


def _from_reader(spec: str, reader: Any, samples: int, cfg: PreprocessConfig) -> EvalData:
    items = []
    for sample in reader:
        items.append(sample)
        if len(items) == samples:
            break
    if not items:
        raise DataError(f"--data {spec!r}: the data set is empty (no readable samples)")
    pixels = np.stack([preprocess(s.image, cfg) for s in items]).astype(np.float32)
    rows = np.arange(len(items))
    data = EvalData(spec, pixels, preprocess=cfg)
    name = Path(str(getattr(reader, "name", spec))).stem
    if isinstance(reader, ImageFolderReader):
        labels = tuple(int(s.meta["label"]) for s in items)
        prompts = tuple(tuple(p) for p in reader.prompts())
        data.zero_shot[name] = BoundTask(ZeroShotTask(name, tuple(reader.classnames), prompts, items, labels), rows)
        data.captioning = BoundTask(CaptionTask("captioning", items, tuple(() for _ in items)), rows)
        data.notes.append("image folder: no captions, so retrieval, BLEU-4/CIDEr-D and hallucination are skipped; "
                          "captions are compared with the reference's own")
    else:
        per_image = [tuple(s.meta.get("captions") or [s.caption]) for s in items]
        texts: dict[str, int] = {}
        image_to_texts = []
        for caps in per_image:
            image_to_texts.append(tuple(texts.setdefault(c, len(texts)) for c in caps))
        data.retrieval = BoundTask(RetrievalTask("retrieval", items, tuple(texts), tuple(image_to_texts)), rows)
        data.captioning = BoundTask(CaptionTask("captioning", items, tuple(per_image)), rows)
        data.notes.append(f"{name}: no class labels, so zero-shot tasks are skipped; no scenes, so the "
                          "hallucination rate is skipped")
    data.notes.append("choice tasks (relation, binding) need synthetic scenes; skipped")
    return data
