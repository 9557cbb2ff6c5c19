"""Teacher-output cache: run the teacher once, memory-map its outputs, keyed by sample id.

A cache directory ``<cache_dir>/<key>/`` holds ``.npy`` arrays (opened with ``mmap_mode``)
with one row per sample, ``ids.json`` (sample id -> row) and ``meta.json``. The key is a
hash of everything the outputs depend on: the teacher's weights and architecture, the
dataset identity, the preprocessing (image size, mean, std), the caption length, top-k and
the KD temperature; change any and a different directory is used (and built). ``meta.json``
is written last, so a build that was interrupted is never mistaken for a complete one.
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
from .forward import TeacherOutputs, teacher_outputs

__all__ = ["TeacherCache", "CacheError", "cache_key", "build_cache", "open_cache", "teacher_fingerprint"]

CACHE_VERSION = 1
_ARRAYS = ("image", "text", "topk_ids", "topk_log_probs")


class CacheError(RuntimeError):
    """A teacher cache is missing, stale or incomplete."""


def teacher_fingerprint(teacher: CoCa) -> str:
    h = hashlib.sha256(teacher.config.to_json().encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def cache_key(teacher_fp: str, data_identity: dict[str, Any], preprocess: dict[str, Any], positions: int,
              topk: int, temperature: float) -> tuple[str, dict[str, Any]]:
    spec = {"version": CACHE_VERSION, "teacher": teacher_fp, "data": data_identity, "preprocess": preprocess,
            "positions": positions, "topk": topk, "temperature": temperature}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20], spec


class TeacherCache:
    """Read side: ``lookup(sample_ids)`` -> :class:`TeacherOutputs` for those samples."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = json.loads((path / "meta.json").read_text())
        self.arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        self.rows = {sid: i for i, sid in enumerate(json.loads((path / "ids.json").read_text()))}
        self.logit_scale = torch.tensor(float(self.meta["logit_scale"]))

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, sample_ids: Sequence[str]) -> TeacherOutputs:
        try:
            rows = np.asarray([self.rows[s] for s in sample_ids])
        except KeyError as err:
            raise CacheError(f"sample {err.args[0]!r} is not in the teacher cache {self.path}") from None
        a = {name: torch.from_numpy(np.ascontiguousarray(arr[rows])) for name, arr in self.arrays.items()}
        return TeacherOutputs(a["image"], a["text"], self.logit_scale, a["topk_ids"].long(), a["topk_log_probs"])


def open_cache(root: str | os.PathLike, key: str) -> TeacherCache | None:
    path = Path(root) / key
    if not (path / "meta.json").is_file():
        return None
    return TeacherCache(path)


@torch.no_grad()
def build_cache(root: str | os.PathLike, key: str, spec: dict[str, Any], teacher: CoCa, data: TrainData,
                tokenizer: Tokenizer, max_text_len: int, batch_size: int = 128, progress: bool = True) -> TeacherCache:
    """Run ``teacher`` over every sample of ``data`` and write the cache (rank 0 only)."""
    from tqdm import tqdm

    root = Path(root)
    final = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = teacher.config
    n, positions, k = len(data), spec["positions"], spec["topk"]
    arrays = {
        "image": np.lib.format.open_memmap(tmp / "image.npy", "w+", np.float32, (n, cfg.embed_dim)),
        "text": np.lib.format.open_memmap(tmp / "text.npy", "w+", np.float32, (n, cfg.embed_dim)),
        "topk_ids": np.lib.format.open_memmap(tmp / "topk_ids.npy", "w+", np.int32, (n, positions, k)),
        "topk_log_probs": np.lib.format.open_memmap(tmp / "topk_log_probs.npy", "w+", np.float32, (n, positions, k)),
    }
    ids: list[str] = []
    teacher = teacher.eval()
    device = next(teacher.parameters()).device
    start = time.time()
    for lo in tqdm(range(0, n, batch_size), desc="teacher cache", unit="batch", disable=not progress):
        hi = min(n, lo + batch_size)
        batch = make_batch(data, range(lo, hi), tokenizer, cfg, max_text_len)
        # Fixed width: one pad column after the longest possible caption (see ``data.trim``).
        text = _pad_to(batch.text, positions + 1, cfg.pad_token_id)
        out = teacher_outputs(teacher, batch.pixels.to(device), text.to(device), k, spec["temperature"],
                              cfg.pad_token_id)
        arrays["image"][lo:hi] = out.image.cpu().numpy()
        arrays["text"][lo:hi] = out.text.cpu().numpy()
        arrays["topk_ids"][lo:hi] = out.topk_ids.cpu().numpy().astype(np.int32)
        arrays["topk_log_probs"][lo:hi] = out.topk_log_probs.cpu().numpy()
        ids.extend(batch.ids)
        logit_scale = float(out.logit_scale)
    for arr in arrays.values():
        arr.flush()
    (tmp / "ids.json").write_text(json.dumps(ids))
    meta = {**spec, "key": key, "n": n, "logit_scale": logit_scale, "build_seconds": round(time.time() - start, 1)}
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
