"""Training-time forward passes of student and teacher.

``text_forward`` / ``decoder_hidden`` are ``TextTower.forward`` / ``MultimodalDecoder.forward``
re-stated for trimmed batches and without the vocabulary head (tests pin them to the
model's own forward), so the head can be applied to a vocabulary subset.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models import CoCa
from .data import trim
from .losses import FeatureProjector, VocabSubset

__all__ = ["text_forward", "decoder_hidden", "StudentForward", "TeacherOutputs", "teacher_outputs",
           "teacher_generated", "teacher_decoder_hidden"]


def text_forward(model: CoCa, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised text embedding and token states of a trimmed batch (see ``data.trim``);
    the CLS token sits at the full context position, as in a full-length input."""
    tt = model.text
    b, length = ids.shape
    ctx = tt.config.context_length
    x = tt.embed(ids) + tt.pos_embed[:length].to(tt.token_embedding.weight.dtype)
    cls = (tt.cls_emb + tt.pos_embed[ctx]).view(1, 1, -1).expand(b, -1, -1).to(x.dtype)
    x = torch.cat([x, cls], dim=1)
    mask = tt._mask(ids)
    for block in tt.blocks:
        x, _, _ = block(x, mask=mask)
    pooled = tt.ln_final(x[:, -1]) @ tt.proj
    return F.normalize(pooled, dim=-1), x[:, :-1]


def decoder_hidden(model: CoCa, token_states: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """The decoder's final normalised states (its forward without the head)."""
    return model.decoder.hidden(token_states, cross)


class StudentForward(nn.Module):
    """Everything trainable in one module, so one DDP wrapper syncs every gradient."""

    def __init__(self, model: CoCa, vocab: VocabSubset, projector: FeatureProjector | None,
                 kd_temperature: float | None, seq_kd_temperature: float | None = None,
                 decoder_projector: nn.Module | None = None):
        """``decoder_projector``: student decoder width -> teacher's (``decoder_feature``);
        None when that term is off."""
        super().__init__()
        self.model = model
        self.projector = projector
        self.vocab = vocab
        self.kd_temperature = kd_temperature
        self.seq_kd_temperature = seq_kd_temperature
        self.decoder_projector = decoder_projector

    def forward(self, pixels: torch.Tensor, text: torch.Tensor, generated: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``generated``: the teacher's own captions of these images (sequence-level KD); the
        student is teacher-forced on them in a second decoder pass over the same image K/V.
        ``negatives``: hard-negative captions (trimmed ids), embedded by the text tower."""
        m = self.model
        image_embed, image_tokens = m.encode_image(pixels)
        text_embed, states = text_forward(m, text)
        cross = m.decoder.cross_kv(image_tokens)
        hidden = decoder_hidden(m, states[:, :-1], cross)
        out = {"image": image_embed, "text": text_embed, "logit_scale": m.logit_scale.exp(),
               "log_probs": self.vocab.log_probs(hidden, m.decoder.head)}
        if negatives is not None:
            out["negative_text"] = text_forward(m, negatives)[0]
        if self.decoder_projector is not None:
            out["proj_decoder"] = self.decoder_projector(hidden)
        if self.kd_temperature is not None:
            out["log_probs_kd"] = self.vocab.log_probs(hidden, m.decoder.head, self.kd_temperature)
        if generated is not None:
            if self.seq_kd_temperature is None:
                raise ValueError("generated captions were given but sequence-level KD is off")
            _, gen_states = text_forward(m, generated)
            gen_hidden = decoder_hidden(m, gen_states[:, :-1], cross)
            out["log_probs_seq_kd"] = self.vocab.log_probs(gen_hidden, m.decoder.head, self.seq_kd_temperature)
        if self.projector is not None:
            out["proj_image"] = self.projector.image(image_embed)
            out["proj_text"] = self.projector.text(text_embed)
        return out


@dataclass
class TeacherOutputs:
    """What the KD losses need from the teacher for one batch (from the cache or live)."""

    image: torch.Tensor  # [B, E_t] normalised
    text: torch.Tensor  # [B, E_t] normalised
    logit_scale: torch.Tensor  # scalar
    topk_ids: torch.Tensor  # int64 [B, T, k]
    topk_log_probs: torch.Tensor  # float32 [B, T, k], at the KD temperature
    # Sequence-level KD: the teacher's greedy caption of each image and its top-k along it.
    gen_text: torch.Tensor | None = None  # int64 [B, G + 1], trimmed (see ``data.trim``)
    gen_topk_ids: torch.Tensor | None = None  # int64 [B, G, k]
    gen_topk_log_probs: torch.Tensor | None = None  # float32 [B, G, k]
    # ``teacher.filter_hallucinated``: false where the teacher's caption is hallucinated.
    gen_keep: torch.Tensor | None = None  # bool [B]
    # ``decoder_feature``: final decoder states along the ground-truth captions (zero where
    # the label is padding); float16 when read from the cache.
    decoder_hidden: torch.Tensor | None = None  # [B, T, W_t]

    def positions(self, n: int) -> "TeacherOutputs":
        """The first ``n`` caption positions (the batch's trimmed length)."""
        hidden = None if self.decoder_hidden is None else self.decoder_hidden[:, :n]
        return dataclasses.replace(self, topk_ids=self.topk_ids[:, :n], topk_log_probs=self.topk_log_probs[:, :n],
                                   decoder_hidden=hidden)

    def with_generated(self, gen_text: torch.Tensor, gen_topk_ids: torch.Tensor, gen_topk_log_probs: torch.Tensor,
                       pad_id: int) -> "TeacherOutputs":
        """These outputs plus sequence-level KD targets, trimmed to the batch's longest caption."""
        gen_text = trim(gen_text.long(), pad_id)
        g = gen_text.shape[1] - 1
        return dataclasses.replace(self, gen_text=gen_text, gen_topk_ids=gen_topk_ids[:, :g].long(),
                                   gen_topk_log_probs=gen_topk_log_probs[:, :g])

    def to(self, device: torch.device) -> "TeacherOutputs":
        return TeacherOutputs(*(None if x is None else x.to(device)
                                for x in (getattr(self, f.name) for f in dataclasses.fields(self))))


def _topk_log_probs(rows: torch.Tensor, head: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the full-vocabulary log-softmax. All-zero head columns (a teacher trained with
    ``caption_vocab: data``) all have logit 0 and are handled in closed form by
    :class:`VocabSubset`: exact, and ~|V|/|used| times cheaper."""
    used = head.detach().abs().sum(dim=0) != 0
    vocab = VocabSubset(torch.nonzero(used).flatten() if bool(used.any()) else None, head.shape[1])
    logp = vocab.log_probs(rows, head, temperature)
    if vocab.full:
        return logp.topk(k, dim=-1)
    # candidates: every used token, and (enough) zero-logit tokens, which all share one value
    n_zero = min(k, vocab.rest)
    zero_ids = torch.nonzero(~used).flatten()[:n_zero].to(rows.device)
    each_zero = (logp[:, -1:] - math.log(vocab.rest)).expand(-1, n_zero)
    cand = torch.cat([logp[:, :-1], each_zero], dim=1)
    cand_ids = torch.cat([vocab.ids.to(rows.device), zero_ids])
    values, pos = cand.topk(k, dim=-1)
    return values, cand_ids[pos]


# Filler for positions without a caption token; finite so masked sums stay finite.
EMPTY_LOG_PROB = -30.0


@torch.no_grad()
def teacher_decoder_hidden(teacher: CoCa, pixels: torch.Tensor, text: torch.Tensor, pad_id: int,
                           image: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The teacher's final decoder states ``[B, T, W]`` along ``text`` (teacher-forced),
    zero at positions whose label is padding (what the ``decoder`` cache stores)."""
    _, image_tokens = image if image is not None else teacher.encode_image(pixels)
    _, states = text_forward(teacher, text)
    hidden = decoder_hidden(teacher, states[:, :-1], teacher.decoder.cross_kv(image_tokens))
    return hidden.float() * (text[:, 1:] != pad_id).unsqueeze(-1)


@torch.no_grad()
def teacher_outputs(teacher: CoCa, pixels: torch.Tensor, text: torch.Tensor, topk: int, temperature: float,
                    pad_id: int, image: tuple[torch.Tensor, torch.Tensor] | None = None,
                    with_decoder_hidden: bool = False) -> TeacherOutputs:
    """Teacher embeddings and top-k next-token log-probabilities over the full vocabulary,
    computed only at positions that predict a real token (bounded memory). ``image``:
    ``teacher.encode_image(pixels)`` when the caller already has it. ``with_decoder_hidden``:
    also the decoder states (as :func:`teacher_decoder_hidden`)."""
    image_embed, image_tokens = image if image is not None else teacher.encode_image(pixels)
    text_embed, states = text_forward(teacher, text)
    hidden = decoder_hidden(teacher, states[:, :-1], teacher.decoder.cross_kv(image_tokens))
    labels = text[:, 1:]
    b, t = labels.shape
    ids = torch.zeros(b, t, topk, dtype=torch.long, device=pixels.device)
    lps = torch.full((b, t, topk), EMPTY_LOG_PROB, dtype=torch.float32, device=pixels.device)
    valid = labels != pad_id
    rows = hidden[valid]
    if rows.numel():
        values, indices = _topk_log_probs(rows, teacher.decoder.head, topk, temperature)
        if teacher.config.vocab_subset:  # head columns -> token ids
            indices = torch.tensor(teacher.config.vocab_subset, device=indices.device)[indices]
        ids[valid], lps[valid] = indices, values
    out = TeacherOutputs(image_embed.float(), text_embed.float(), teacher.logit_scale.exp().detach().float(), ids, lps)
    if with_decoder_hidden:
        out.decoder_hidden = hidden.float() * valid.unsqueeze(-1)
    return out


@torch.no_grad()
def teacher_generated(teacher: CoCa, pixels: torch.Tensor, positions: int, topk: int, temperature: float,
                      image: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence-level KD targets: the teacher's greedy caption of each image (KV-cached, at
    most ``positions`` new tokens, ``[B, positions + 1]`` with the start token, pad after the
    end token) and its top-k next-token log-probabilities along that caption. The image is
    encoded once for both (or ``image`` is used)."""
    from ..models.generate import greedy_generate

    cfg = teacher.config
    if image is None:
        image = teacher.encode_image(pixels)
    gen = greedy_generate(teacher, pixels, max_new_tokens=positions, image_tokens=image[1])
    if gen.shape[1] < positions + 1:
        pad = torch.full((gen.shape[0], positions + 1 - gen.shape[1]), cfg.pad_token_id, dtype=gen.dtype,
                         device=gen.device)
        gen = torch.cat([gen, pad], dim=1)
    out = teacher_outputs(teacher, pixels, gen, topk, temperature, cfg.pad_token_id, image)
    return gen, out.topk_ids, out.topk_log_probs
