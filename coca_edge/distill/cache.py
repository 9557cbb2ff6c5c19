"""Teacher-output cache: run the teacher once, memory-map its outputs, keyed by sample id.

A cache directory ``<cache_dir>/<key>/`` holds ``.npy`` arrays (opened with ``mmap_mode``)
with one row per sample, ``ids.json`` (sample id -> row) and ``meta.json``. The key is a
hash of everything the outputs depend on: the teacher's weights and architecture, the
dataset identity, the preprocessing (image size, mean, std), the caption length, top-k and
the KD temperature; change any and a different directory is used (and built). ``meta.json``
is written last, so a build that was interrupted is never mistaken for a complete one.

Three kinds of cache share this format: ``targets`` (embeddings and top-k along the
ground-truth captions), ``generated`` (for sequence-level KD: the teacher's greedy
caption of every image and its top-k along it) and ``decoder`` (for ``decoder_feature``:
the decoder's final states along the ground-truth captions, float16 to bound the size,
``N x positions x width``). Each has its own key, so switching a term on builds only its
part and the keys of existing caches never change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..models import CoCa
from ..tokenizer import Tokenizer
from .data import TrainData, make_batch
from .forward import TeacherOutputs, teacher_decoder_hidden, teacher_generated, teacher_outputs

__all__ = ["TeacherCache", "CacheError", "cache_key", "build_cache", "open_cache", "teacher_fingerprint", "KINDS"]

CACHE_VERSION = 1
KINDS = {"targets": ("image", "text", "topk_ids", "topk_log_probs"),
         "generated": ("gen_text", "gen_topk_ids", "gen_topk_log_probs"),
         "decoder": ("decoder_hidden",)}


class CacheError(RuntimeError):
    """A teacher cache is missing, stale or incomplete."""


def teacher_fingerprint(teacher: CoCa) -> str:
    h = hashlib.sha256(teacher.config.to_json().encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher_fp: str, data_identity: dict[str, Any], preprocess: dict[str, Any], positions: int,
              topk: int, temperature: float, kind: str = "targets") -> tuple[str, dict[str, Any]]:
    if kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; kinds are {sorted(KINDS)}")
    spec = {"version": CACHE_VERSION, "teacher": teacher_fp, "data": data_identity, "preprocess": preprocess,
            "positions": positions, "topk": topk, "temperature": temperature}
    if kind != "targets":  # keeps the keys of existing target caches unchanged
        spec["kind"] = kind
        if kind == "generated":
            spec["generation"] = {"strategy": "greedy", "max_new_tokens": positions}
        if kind == "decoder":  # states depend on neither k nor the temperature
            del spec["topk"], spec["temperature"]
            spec["dtype"] = "float16"
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20], spec


class TeacherCache:
    """Read side: ``lookup(sample_ids)`` -> :class:`TeacherOutputs` (a ``targets`` cache) or
    ``rows(sample_ids)`` -> its arrays (either kind)."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self.kind = self.meta.get("kind", "targets")
        self.arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in KINDS[self.kind]}
        self.index = {sid: i for i, sid in enumerate(json.loads((path / "ids.json").read_text()))}
        self.logit_scale = torch.tensor(float(self.meta.get("logit_scale", float("nan"))))

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, sample_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        try:
            rows = np.asarray([self.index[s] for s in sample_ids])
        except KeyError as err:
            raise CacheError(f"sample {err.args[0]!r} is not in the teacher cache {self.path}") from None
        return {name: torch.from_numpy(np.ascontiguousarray(arr[rows])) for name, arr in self.arrays.items()}

    def lookup(self, sample_ids: Sequence[str]) -> TeacherOutputs:
        if self.kind != "targets":
            raise CacheError(f"{self.path} is a {self.kind!r} cache; lookup needs a 'targets' cache")
        a = self.rows(sample_ids)
        return TeacherOutputs(a["image"], a["text"], self.logit_scale, a["topk_ids"].long(), a["topk_log_probs"])


def open_cache(root: str | os.PathLike, key: str) -> TeacherCache | None:
    path = Path(root) / key
    if not (path / "meta.json").is_file():
        return None
    return TeacherCache(path)


@torch.no_grad()
def build_cache(root: str | os.PathLike, key: str, spec: dict[str, Any], teacher: CoCa, data: TrainData,
                tokenizer: Tokenizer, max_text_len: int, batch_size: int = 128, progress: bool = True) -> TeacherCache:
    """Run ``teacher`` over every sample of ``data`` and write the cache (rank 0 only); the
    kind (``spec["kind"]``, default ``targets``) says what is stored."""
    from tqdm import tqdm

    root = Path(root)
    final = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = teacher.config
    kind = spec.get("kind", "targets")
    n, positions, k = len(data), spec["positions"], spec.get("topk", 1)
    shapes = {"image": (np.float32, (n, cfg.embed_dim)), "text": (np.float32, (n, cfg.embed_dim)),
              "topk_ids": (np.int32, (n, positions, k)), "topk_log_probs": (np.float32, (n, positions, k)),
              "gen_text": (np.int32, (n, positions + 1)), "gen_topk_ids": (np.int32, (n, positions, k)),
              "gen_topk_log_probs": (np.float32, (n, positions, k)),
              "decoder_hidden": (np.float16, (n, positions, cfg.decoder.width))}
    arrays = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", *shapes[name]) for name in KINDS[kind]}
    ids: list[str] = []
    teacher = teacher.eval()
    device = next(teacher.parameters()).device
    start = time.time()
    extra: dict[str, Any] = {}
    desc = {"targets": "teacher cache", "generated": "teacher captions", "decoder": "teacher decoder states"}[kind]
    for lo in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        hi = min(n, lo + batch_size)
        batch = make_batch(data, range(lo, hi), tokenizer, cfg, max_text_len)
        pixels = batch.pixels.to(device)
        if kind == "targets":
            # Fixed width: one pad column after the longest possible caption (see ``data.trim``).
            text = _pad_to(batch.text, positions + 1, cfg.pad_token_id)
            out = teacher_outputs(teacher, pixels, text.to(device), k, spec["temperature"], cfg.pad_token_id)
            values = {"image": out.image, "text": out.text, "topk_ids": out.topk_ids,
                      "topk_log_probs": out.topk_log_probs}
            extra["logit_scale"] = float(out.logit_scale)
        elif kind == "generated":
            gen, gen_ids, gen_lps = teacher_generated(teacher, pixels, positions, k, spec["temperature"])
            values = {"gen_text": gen, "gen_topk_ids": gen_ids, "gen_topk_log_probs": gen_lps}
        else:
            text = _pad_to(batch.text, positions + 1, cfg.pad_token_id)
            values = {"decoder_hidden": teacher_decoder_hidden(teacher, pixels, text.to(device), cfg.pad_token_id)}
        for name, value in values.items():
            arrays[name][lo:hi] = value.cpu().numpy().astype(arrays[name].dtype)
        ids.extend(batch.ids)
    for arr in arrays.values():
        arr.flush()
    (tmp / "ids.json").write_text(json.dumps(ids))
    meta = {**spec, "kind": kind, "key": key, "n": n, **extra, "build_seconds": round(time.time() - start, 1)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return TeacherCache(final)


def _pad_to(text: torch.Tensor, width: int, pad_id: int) -> torch.Tensor:
    if text.shape[1] >= width:
        return text[:, :width]
    pad = torch.full((text.shape[0], width - text.shape[1]), pad_id, dtype=text.dtype)
    return torch.cat([text, pad], dim=1)
