"""Training batches: random-access datasets, a step-indexed sampler and text trimming.

The sampler is a pure function of ``(seed, step)``: the global batch of step ``s`` is a
slice of the concatenated per-epoch permutations, and rank ``r`` of ``w`` takes the
``r``-th contiguous chunk of it. Resuming needs only the step; a ``w``-process run sees
exactly the samples of the one-process run with the same global batch, in the same order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..data import PreprocessConfig, SyntheticScenes, normalize, resize_and_crop
from ..models import CoCaConfig
from ..tokenizer import Tokenizer
from .config import DataConfig
from .faithful import synthetic_negative, word_swap_negative

__all__ = ["TrainData", "StepSampler", "Batch", "HardNegatives", "open_train_data", "tokenize", "trim",
           "caption_keys"]


@dataclass
class HardNegatives:
    """One negative caption per sample (``loss.hard_negative``). ``valid`` is false where a
    sample has none or where its negative's tokens equal some positive of the batch;
    ``keys`` / ``positive_keys`` identify token rows so the trainer can repeat that check
    against the positives of every rank."""

    text: torch.Tensor  # int64 [B, L'], trimmed; rows without a negative hold an empty caption
    valid: torch.Tensor  # bool [B]
    keys: torch.Tensor  # int64 [B]
    positive_keys: torch.Tensor  # int64 [B]


@dataclass
class Batch:
    ids: list[str]
    pixels: torch.Tensor  # float32 [B, 3, H, W], normalised
    text: torch.Tensor  # int64 [B, L], trimmed (see ``trim``)
    negatives: HardNegatives | None = None  # only with ``loss.hard_negative > 0``


class _Memo:
    """Per-sample values computed once and kept in memory up to ``budget`` bytes (the first
    samples asked for are kept; the rest are recomputed every time). Training visits every
    sample once an epoch, and the demo's 20k synthetic scenes ~10 times: rendering them and
    tokenising their captions again each time took ~40% of a demo-student step."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.values: dict[tuple, object] = {}

    def get(self, kind: tuple, indices: Sequence[int], compute: Callable[[list[int]], list], size) -> list:
        idx = [int(i) for i in indices]
        missing = sorted({i for i in idx if (kind, i) not in self.values})
        fresh = dict(zip(missing, compute(missing))) if missing else {}
        for i, value in fresh.items():
            n = size(value)
            if self.used + n <= self.budget:
                self.values[(kind, i)] = value
                self.used += n
        return [fresh[i] if i in fresh else self.values[(kind, i)] for i in idx]


class TrainData:
    """Random access to ``(uint8 images [N, H, W, 3], captions, sample ids)``. ``memo_bytes``:
    keep rendered samples and token rows in memory up to this many bytes (0: never)."""

    def __init__(self, name: str, length: int, identity: dict, fetch, captions,
                 negatives: Callable[[Sequence[int]], list[str | None]] | None = None,
                 scenes: Callable[[Sequence[int]], list] | None = None, memo_bytes: int = 0,
                 memo_images: bool = True):
        self.name, self.length, self.identity = name, length, identity
        self._fetch, self._captions = fetch, captions
        self._negatives, self._scenes = negatives, scenes
        self._memo = _Memo(memo_bytes)
        self._memo_images = memo_images and memo_bytes > 0  # False where images are in memory already

    def __len__(self) -> int:
        return self.length

    def fetch(self, indices: Sequence[int]) -> tuple[np.ndarray, list[str], list[str]]:
        if not self._memo_images:
            return self._fetch(indices)

        def compute(missing):
            images, captions, ids = self._fetch(missing)
            return [(np.ascontiguousarray(images[j]), captions[j], ids[j]) for j in range(len(missing))]

        rows = self._memo.get(("sample",), indices, compute, lambda v: v[0].nbytes + 64 + 2 * len(v[1]))
        return np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows]

    def token_rows(self, kind: tuple, indices: Sequence[int], compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """``compute(indices) -> [N, L]`` int rows, memoised per sample under ``kind``."""
        if self._memo.budget <= 0:
            return compute([int(i) for i in indices])
        rows = self._memo.get(kind, indices, lambda missing: list(compute(missing)), lambda v: v.nbytes + 64)
        return np.stack(rows)

    def captions(self, indices: Sequence[int]) -> list[str]:
        """Captions only (no image decoding or rendering)."""
        return self._captions(indices)

    def negatives(self, indices: Sequence[int]) -> list[str | None]:
        """Each sample's hard-negative caption, None where there is none (see ``faithful``)."""
        if self._negatives is None:
            raise ValueError(f"{self.name} has no hard negatives")
        return self._negatives(indices)

    @property
    def has_scenes(self) -> bool:
        return self._scenes is not None

    def scenes(self, indices: Sequence[int]) -> list:
        """The ``Scene`` of each sample (synthetic-scenes only)."""
        if self._scenes is None:
            raise ValueError(f"{self.name} has no scenes: only synthetic-scenes knows what each image shows")
        return self._scenes(indices)


def open_train_data(cfg: DataConfig, model_config: CoCaConfig) -> TrainData:
    size = model_config.vision.image_size
    memo = int(cfg.memory_cache_mb * 2**20)
    if cfg.dataset == "synthetic-scenes":
        ds = SyntheticScenes("train", seed=cfg.seed, length=cfg.train_size, image_size=size)

        def fetch(indices):
            images, captions, _ = ds.batch([int(i) for i in indices])
            return images, captions, [f"{ds.name}/train/{int(i)}" for i in indices]

        def negatives(indices):
            found = [synthetic_negative(ds, int(i)) for i in indices]
            return [None if n is None else n.caption for n in found]

        identity = {"dataset": ds.name, "seed": cfg.seed, "length": len(ds), "scene_config": ds.config.to_dict()}
        return TrainData(ds.name, len(ds), identity, fetch, lambda idx: [ds.caption(int(i)) for i in idx],
                         negatives, lambda idx: [ds.scene(int(i)) for i in idx], memo_bytes=memo)
    return _csv_data(cfg, size, memo)


def _csv_data(cfg: DataConfig, size: int, memo: int) -> TrainData:
    """User data (open_clip CSV/TSV): decoded once and held in memory at the model's size,
    which suits fine-tuning sets of up to some 100k small images."""
    import hashlib
    import os

    from ..data import CsvReader

    pre = PreprocessConfig(image_size=size)
    reader = CsvReader(cfg.dataset, img_key=cfg.csv_image_key, caption_key=cfg.csv_caption_key,
                       transform=lambda img: np.asarray(resize_and_crop(img.convert("RGB"), pre)))
    images, captions, ids = [], [], []
    for sample in reader:
        images.append(sample.image)
        captions.append(sample.caption)
        ids.append(sample.id)
        if len(ids) >= cfg.train_size:
            break
    if not ids:
        raise ValueError(f"{cfg.dataset}: no usable samples ({reader.skipped.summary()})")
    stack = np.stack(images)
    digest = hashlib.sha256()
    digest.update(open(cfg.dataset, "rb").read())
    identity = {"dataset": os.path.abspath(cfg.dataset), "csv_sha256": digest.hexdigest(), "length": len(ids)}

    def fetch(indices):
        idx = [int(i) for i in indices]
        return stack[idx], [captions[i] for i in idx], [ids[i] for i in idx]

    return TrainData(os.path.basename(cfg.dataset), len(ids), identity, fetch,
                     lambda idx: [captions[int(i)] for i in idx],
                     lambda idx: [word_swap_negative(captions[int(i)]) for i in idx], memo_bytes=memo,
                     memo_images=False)


class StepSampler:
    def __init__(self, length: int, global_batch: int, seed: int):
        self.length, self.global_batch, self.seed = length, global_batch, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.length))
        return self._perm[1]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.length

    def global_indices(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        out = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(positions // self.length):
            sel = positions // self.length == epoch
            out[sel] = self._permutation(int(epoch))[positions[sel] % self.length]
        return out

    def indices(self, step: int, micro: int, n_micro: int, rank: int, world: int) -> np.ndarray:
        """Micro-batch ``micro`` of ``n_micro`` of the global batch, chunk ``rank`` of ``world``."""
        idx = self.global_indices(step)
        per_micro = self.global_batch // n_micro
        idx = idx[micro * per_micro:(micro + 1) * per_micro]
        per_rank = per_micro // world
        return idx[rank * per_rank:(rank + 1) * per_rank]


def tokenize(tokenizer: Tokenizer, captions: Sequence[str], max_len: int, eot_id: int, pad_id: int) -> np.ndarray:
    """``[N, context]`` ids with captions longer than ``max_len`` cut (end token kept)."""
    ids = np.asarray(tokenizer(list(captions)))
    if max_len < ids.shape[1]:
        long = ids[:, max_len] != pad_id
        ids = ids.copy()
        ids[:, max_len:] = pad_id
        ids[long, max_len - 1] = eot_id
    return ids


def trim(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing all-pad columns, keeping one pad column after the longest caption.

    The text tower's CLS query attends to that first pad position under open_clip's
    legacy mask, so with it (and the CLS at the full context position, see
    ``text_forward``) the embeddings equal those of the full-length input.
    """
    used = int((ids != pad_id).sum(dim=1).max())
    return ids[:, : min(ids.shape[1], used + 1)]


def caption_keys(ids: np.ndarray) -> np.ndarray:
    """int64 ``[N]`` hash of each tokenised caption row: equal rows, equal keys."""
    return np.asarray([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little", signed=True)
                       for row in np.ascontiguousarray(ids)], dtype=np.int64)


def _token_kind(name: str, tokenizer: Tokenizer, model_config: CoCaConfig, max_text_len: int) -> tuple:
    """Memo key of token rows: what tokenising depends on."""
    return name, tokenizer.context_length, max_text_len, model_config.eot_token_id, model_config.pad_token_id


def _hard_negatives(data: TrainData, indices: Sequence[int], positives: np.ndarray, tokenizer: Tokenizer,
                    model_config: CoCaConfig, max_text_len: int) -> HardNegatives:
    def compute(idx):  # token row + a last column: 1 where the sample has a negative
        found = data.negatives(idx)
        ids = tokenize(tokenizer, ["" if n is None else n for n in found], max_text_len, model_config.eot_token_id,
                       model_config.pad_token_id)
        return np.concatenate([ids, np.asarray([[n is not None] for n in found], dtype=ids.dtype)], axis=1)

    rows = data.token_rows(_token_kind("negatives", tokenizer, model_config, max_text_len), indices, compute)
    ids, found = rows[:, :-1], rows[:, -1].astype(bool)
    keys, positive_keys = caption_keys(ids), caption_keys(positives)
    # compared as tokens, so a negative that differs only past max_text_len is dropped too
    valid = found & ~np.isin(keys, positive_keys)
    return HardNegatives(trim(torch.from_numpy(ids), model_config.pad_token_id), torch.from_numpy(valid),
                         torch.from_numpy(keys), torch.from_numpy(positive_keys))


def make_batch(data: TrainData, indices: Sequence[int], tokenizer: Tokenizer, model_config: CoCaConfig,
               max_text_len: int, negatives: bool = False) -> Batch:
    """``negatives``: also each sample's hard-negative caption (``loss.hard_negative``)."""
    images, captions, ids = data.fetch(indices)
    pre = PreprocessConfig(image_size=model_config.vision.image_size, mean=model_config.image_mean,
                           std=model_config.image_std)
    pixels = torch.from_numpy(normalize(images, pre))
    by_index = dict(zip((int(i) for i in indices), captions))
    tokens = data.token_rows(_token_kind("tokens", tokenizer, model_config, max_text_len), indices, lambda idx: tokenize(
        tokenizer, [by_index[i] for i in idx], max_text_len, model_config.eot_token_id, model_config.pad_token_id))
    hard = _hard_negatives(data, indices, tokens, tokenizer, model_config, max_text_len) if negatives else None
    return Batch(ids, pixels, trim(torch.from_numpy(tokens), model_config.pad_token_id), hard)
