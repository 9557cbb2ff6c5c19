"""Loss terms of CoCa training and teacher->student distillation.

Ground truth: ``contrastive`` (symmetric InfoNCE with the learnable logit scale) and
``caption`` (next-token cross-entropy). Knowledge from a teacher: ``affinity`` (KL between
the teacher's and the student's in-batch image->text and text->image distributions, as in
TinyCLIP / MobileCLIP), ``feature`` (student embeddings matched to the teacher's, through a
learned projection when widths differ, as in CLIP-KD), ``decoder_feature`` (the same for the
multimodal decoder's final states, per caption token) and ``caption_kd`` (token-level KL to
the teacher's next-token distribution at a temperature, from its cached top-k). For
attribute binding, ``hard_negative`` (NegCLIP) adds one negative caption per sample as
extra image->text candidates.

Terms that average over tokens or samples return ``(sum, count)`` so the trainer can
normalise by the *global* count: that keeps a multi-process run equal to a one-process run
with the same global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VocabSubset",
    "contrastive_loss",
    "hard_negative_loss",
    "caption_loss",
    "affinity_loss",
    "feature_loss",
    "decoder_feature_loss",
    "caption_kd_loss",
    "FeatureProjector",
    "width_projection",
]


class VocabSubset:
    """Next-token log-probabilities over the full vocabulary, computing the head only on ``ids``.

    Head columns outside ``ids`` must be zero (the trainer zeroes them and they receive
    no gradient), so every outside token has logit 0 and their joint softmax share is
    ``(V - |ids|) * exp(0)``: one extra "rest" column with logit ``log(V - |ids|)`` makes
    the normaliser exact. With ``ids`` = the whole vocabulary this is the ordinary softmax.

    ``pruned``: the head *is* the ``ids`` columns (a model with ``vocab_subset``); tokens
    outside have probability 0, so there is no rest column, and the losses leave such
    tokens out (:meth:`contains`).
    """

    def __init__(self, ids: torch.Tensor | None, vocab_size: int, pruned: bool = False):
        self.vocab_size = vocab_size
        self.pruned = pruned
        if ids is None:
            ids = torch.arange(vocab_size)
        ids = torch.unique(ids.long())
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"vocabulary subset must be non-empty ids in [0, {vocab_size})")
        self.ids = ids
        self.rest = vocab_size - ids.numel()
        self.position = torch.full((vocab_size,), -1, dtype=torch.long)
        self.position[ids] = torch.arange(ids.numel())
        if pruned:
            self.rest = 0

    @classmethod
    def for_model(cls, config, ids: torch.Tensor | None) -> "VocabSubset":
        """A pruned model's own subset; else ``ids`` (None: the whole vocabulary)."""
        if config.vocab_subset:
            return cls(torch.tensor(config.vocab_subset), config.vocab_size, pruned=True)
        return cls(ids, config.vocab_size)

    @property
    def full(self) -> bool:
        return self.rest == 0

    def contains(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask: which ``token_ids`` the model can predict (all of them unless pruned)."""
        if not self.pruned:
            return torch.ones_like(token_ids, dtype=torch.bool)
        return self.position.to(token_ids.device)[token_ids] >= 0

    def log_probs(self, hidden: torch.Tensor, head: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """``[..., W]`` -> ``[..., |ids| (+1 rest column)]`` log-probabilities (fp32)."""
        logits = (hidden @ (head if self.full else head[:, self.ids])).float() / temperature
        if not self.full:
            rest = torch.full(logits.shape[:-1] + (1,), math.log(self.rest), dtype=logits.dtype, device=logits.device)
            logits = torch.cat([logits, rest], dim=-1)
        return logits.log_softmax(dim=-1)

    def gather(self, log_probs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of ``token_ids`` (any vocabulary id) from :meth:`log_probs` output."""
        pos = self.position.to(token_ids.device)[token_ids]
        if self.pruned:  # outside tokens: a finite stand-in for log 0 (the losses mask them out)
            picked = log_probs.gather(-1, pos.clamp(min=0))
            return torch.where(pos >= 0, picked, torch.full_like(picked, -1.0e4))
        if self.full:
            return log_probs.gather(-1, pos)
        inside = pos >= 0
        picked = log_probs.gather(-1, pos.clamp(min=0))
        outside = log_probs[..., -1:].expand_as(picked) - math.log(self.rest)
        return torch.where(inside, picked, outside)

    def mean_log_prob(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Mean over the whole vocabulary of the log-probabilities (for label smoothing)."""
        if self.full:  # (pruned: the mean over the tokens it has)
            return log_probs.mean(dim=-1)
        each_rest = log_probs[..., -1] - math.log(self.rest)
        return (log_probs[..., :-1].sum(dim=-1) + self.rest * each_rest) / self.vocab_size


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over normalised ``[B, E]`` embeddings (the whole, gathered batch)."""
    logits = logit_scale * image.float() @ text.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def hard_negative_loss(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor, valid: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """NegCLIP's image->text InfoNCE: each image against the batch's ``[B, E]`` captions plus
    the batch's ``[B, E]`` negative captions where ``valid`` (bool ``[B]``); negatives are
    extra columns only, there is no text->image direction for them."""
    candidates = torch.cat([text.float(), negatives.float()[valid]])
    logits = logit_scale * image.float() @ candidates.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def caption_loss(log_probs: torch.Tensor, labels: torch.Tensor, vocab: VocabSubset, pad_id: int,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: ``(sum over non-pad tokens, their count)``."""
    mask = (labels != pad_id) & vocab.contains(labels)
    nll = -vocab.gather(log_probs, labels.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        nll = (1 - label_smoothing) * nll - label_smoothing * vocab.mean_log_prob(log_probs)
    return (nll * mask).sum(), mask.sum()


def _row_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    t = teacher_logits.float().log_softmax(dim=-1)
    s = student_logits.float().log_softmax(dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean()


def affinity_loss(student_image: torch.Tensor, student_text: torch.Tensor, student_scale: torch.Tensor,
                  teacher_image: torch.Tensor, teacher_text: torch.Tensor, teacher_scale: torch.Tensor | float,
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the in-batch image->text and text->image distributions,
    each model at its own logit scale, both divided by ``temperature``."""
    s = student_scale * student_image.float() @ student_text.float().T / temperature
    t = teacher_scale * teacher_image.float() @ teacher_text.float().T / temperature
    return (_row_kl(t, s) + _row_kl(t.T, s.T)) / 2


class FeatureProjector(nn.Module):
    """Student embedding -> teacher embedding space; identity when the widths match
    (a learned projection only where it is needed)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.image = width_projection(student_dim, teacher_dim)
        self.text = width_projection(student_dim, teacher_dim)


def width_projection(student_dim: int, teacher_dim: int) -> nn.Module:
    """Identity for equal widths, else a learned bias-free linear map (as ``FeatureProjector``)."""
    return nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim, bias=False)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module,
                 metric: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample distance of projected student embeddings to the (normalised) teacher's:
    ``(sum, count)``. ``cosine``: 1 - cos; ``l2``: squared distance of unit vectors."""
    s = F.normalize(projection(student).float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    if metric == "cosine":
        per = 1 - (s * t).sum(dim=-1)
    elif metric == "l2":
        per = (s - t).pow(2).sum(dim=-1)
    else:
        raise ValueError(f"unknown feature metric {metric!r}")
    return per.sum(), torch.tensor(per.shape[0], device=per.device)


def decoder_feature_loss(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module,
                         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - cos`` between the projected student decoder states ``[B, T, W_s]`` and the
    teacher's ``[B, T, W_t]`` at the same caption positions: ``(sum over mask, its count)``."""
    s = F.normalize(projection(student).float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    per = 1 - (s * t).sum(dim=-1)
    return (per * mask).sum(), mask.sum()


def caption_kd_loss(student_log_probs: torch.Tensor, vocab: VocabSubset, teacher_ids: torch.Tensor,
                    teacher_log_probs: torch.Tensor, mask: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level KL(teacher || student) at ``temperature`` from the teacher's top-k.

    ``teacher_ids`` / ``teacher_log_probs`` ``[B, T, k]`` are the teacher's k most likely
    next tokens and their full-vocabulary log-probabilities at the same temperature; the
    rest of its mass is one "other" bucket, compared with the student's mass outside those
    k tokens. This is the exact KL between both distributions coarsened to k + 1 outcomes:
    zero when the student equals the teacher, and it still penalises student mass placed
    outside the teacher's top-k. Scaled by ``temperature ** 2`` (Hinton et al.). A pruned
    student cannot predict tokens outside its vocabulary: those top-k entries join the
    teacher's "other" bucket (where the student has them at probability 0).
    Returns ``(sum over masked positions, their count)``.
    """
    s = vocab.gather(student_log_probs, teacher_ids)
    t = teacher_log_probs.float()
    pt = t.exp() * vocab.contains(teacher_ids)
    kl = (pt * (t - s)).sum(dim=-1)
    rest_t = (1 - pt.sum(dim=-1)).clamp(min=0)
    rest_s = (1 - s.exp().sum(dim=-1)).clamp(min=1e-12)
    kl = kl + torch.where(rest_t > 0, rest_t * (rest_t.clamp(min=1e-12).log() - rest_s.log()), torch.zeros_like(kl))
    kl = kl * temperature ** 2
    return (kl * mask).sum(), mask.sum()
