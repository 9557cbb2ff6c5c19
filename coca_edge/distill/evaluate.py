"""Periodic evaluation on synthetic-scenes: zero-shot top-1, retrieval R@1/5, captions.

Uses the data package's tasks (``coca_edge.data.synthetic_tasks``); only the model calls
live here. ``zero_shot_top1`` is the mean top-1 of the colour, shape, size and count tasks;
``retrieval_R@1`` the mean of image->text and text->image R@1.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import PreprocessConfig, normalize, score_captions, synthetic_tasks
from ..models import CoCa
from ..models.generate import greedy_generate
from ..tokenizer import Tokenizer
from ..data.metrics import bleu4, cider_d

__all__ = ["Evaluator", "ZERO_SHOT_TASKS"]

ZERO_SHOT_TASKS = ("color", "shape", "size", "count")


class Evaluator:
    def __init__(self, image_size: int, split: str = "val", n: int = 300, captions: int = 100, seed: int = 0,
                 batch_size: int = 128, max_new_tokens: int = 24):
        self.tasks = synthetic_tasks(split, n, seed=seed, image_size=image_size)
        self.captions, self.batch_size, self.max_new_tokens = captions, batch_size, max_new_tokens
        self.tokenizer = Tokenizer()

    def _pixels(self, model: CoCa, samples) -> torch.Tensor:
        cfg = model.config
        images, _, _ = samples.dataset.batch(list(samples.indices))
        pre = PreprocessConfig(image_size=cfg.vision.image_size, mean=cfg.image_mean, std=cfg.image_std)
        return torch.from_numpy(normalize(images, pre))

    def _images(self, model: CoCa, samples) -> np.ndarray:
        pixels = self._pixels(model, samples)
        device = next(model.parameters()).device
        out = [model.encode_image(pixels[i:i + self.batch_size].to(device))[0].float().cpu()
               for i in range(0, len(pixels), self.batch_size)]
        return torch.cat(out).numpy()

    def _texts(self, model: CoCa, texts: list[str]) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(self.tokenizer(texts)))
        device = next(model.parameters()).device
        out = [model.encode_text(ids[i:i + self.batch_size].to(device))[0].float().cpu()
               for i in range(0, len(ids), self.batch_size)]
        return torch.cat(out).numpy()

    @torch.no_grad()
    def __call__(self, model: CoCa) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        out: dict[str, Any] = {}
        image_cache: dict[int, np.ndarray] = {}

        def images_of(task) -> np.ndarray:
            key = id(task.samples)
            if key not in image_cache:
                image_cache[key] = self._images(model, task.samples)
            return image_cache[key]

        for name in ZERO_SHOT_TASKS:
            task = self.tasks[name]
            out[f"zs_{name}"] = task.score(images_of(task), task.class_embeddings(lambda t: self._texts(model, t)))["accuracy"]
        out["zero_shot_top1"] = float(np.mean([out[f"zs_{n}"] for n in ZERO_SHOT_TASKS]))
        for name in ("relation", "binding"):
            task = self.tasks[name]
            out[name] = task.score(images_of(task), task.candidate_embeddings(lambda t: self._texts(model, t)))["accuracy"]
        task = self.tasks["retrieval"]
        r = task.score(images_of(task), self._texts(model, list(task.texts)), ks=(1, 5))
        out.update({k: r[k] for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")})
        out["retrieval_R@1"] = (r["i2t_R@1"] + r["t2i_R@1"]) / 2
        if self.captions:
            task = self.tasks["captioning"]
            samples = task.samples[: self.captions]
            pixels = self._pixels(model, samples).to(next(model.parameters()).device)
            ids = torch.cat([greedy_generate(model, pixels[i:i + self.batch_size], self.max_new_tokens).cpu()[:, 1:]
                             for i in range(0, len(pixels), self.batch_size)]) if len(pixels) else torch.zeros(0, 1)
            preds = [self.tokenizer.decode(row.tolist()) for row in ids]
            refs = [list(r) for r in task.references[: len(preds)]]
            scored = score_captions(preds, list(task.scenes[: len(preds)]), refs)
            out.update({"bleu4": bleu4(preds, refs), "cider": cider_d(preds, refs),
                        "caption_exact": scored["exact_match"], "hallucination_rate": scored["hallucination_rate"],
                        "examples": preds[:5]})
        model.train(was_training)
        return out
