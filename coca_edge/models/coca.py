"""CoCa in PyTorch with an explicit, export-friendly KV cache.

Weights are the same tensors as open_clip's CoCa (see ``openclip.py`` for the name
mapping); the computation is written so that a single decode step - text tower and
multimodal decoder over the new tokens only, attending to cached keys/values - can be
exported as one graph.

KV cache layout. In PyTorch (``DecodeCache``) one tensor per tower::

    text     [text.layers,    2, batch, text.heads,    past, text.head_dim]
    decoder  [decoder.layers, 2, batch, decoder.heads, past, decoder.head_dim]
    cross    [decoder.layers, 2, batch, decoder.heads, num_image_tokens, decoder.head_dim]

Index 0 of the second axis is K, index 1 is V. ``past`` may be 0 (first step). The exported
decoder graph takes and returns the same cache one ``[batch, heads, past, head_dim]`` tensor
per layer and K / V (``decode_layers``): slicing a stacked input and stacking the presents
back cost 21% of an INT8 batch-8 step (docs/export.md).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import CoCaConfig

__all__ = ["CoCa", "DecodeCache", "ContextLengthError", "PRUNED_LOGIT", "LayerNorm", "half_with_fp32_blocks",
           "stack_layers"]

# The logit of every token outside a pruned model's vocabulary (``CoCaConfig.vocab_subset``):
# finite, so differences and KL terms between two pruned models stay finite and FP16 holds
# it, and low enough that softmax gives those tokens exactly 0 in FP32 and greedy or beam
# search never picks one.
PRUNED_LOGIT = -1.0e4


def _subset_index(config: CoCaConfig, outside: int) -> torch.Tensor | None:
    """int32 ``[vocab_size]``: each token id's row in a pruned model (``outside`` where the
    id is not kept); None for an unpruned model."""
    if not config.vocab_subset:
        return None
    index = torch.full((config.vocab_size,), outside, dtype=torch.int32)
    index[torch.tensor(config.vocab_subset)] = torch.arange(len(config.vocab_subset), dtype=torch.int32)
    return index


class ContextLengthError(ValueError):
    """More tokens than the model's positional embedding holds."""


class DecodeCache(NamedTuple):
    text: torch.Tensor
    decoder: torch.Tensor
    cross: torch.Tensor

    @property
    def past_length(self) -> int:
        return self.text.shape[4]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in its parameters' dtype and returned in the input's: a model
    cast to FP16 with its LayerNorms kept FP32 (``half_with_fp32_blocks``) normalises in FP32.
    With one dtype throughout it is ``nn.LayerNorm`` (the casts are no-ops)."""

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised ``x`` in the parameters' dtype (the decoder's last one feeds an FP32 head)."""
        return super().forward(x.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float, quick_gelu: bool):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU() if quick_gelu else nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, w = x.shape
    return x.view(b, s, heads, w // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _attend_keys_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for decode steps, computed as ``K @ q^T`` so that only the few new queries
    are transposed, never the cached keys (a per-step transpose of the 255 image keys of every
    layer cost ~19% of an exported batch-8 decode step). Same sums as SDPA; FP16 / BF16 scores
    take their softmax in FP32, as SDPA's fused CPU / CUDA kernels accumulate it (an FP32
    model, which is what is exported, never takes that branch)."""
    scores = torch.matmul(k, q.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # [B, H, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask.transpose(-1, -2), float("-inf"))
    if scores.dtype == torch.float32:
        probs = scores.softmax(dim=-2)
    else:
        probs = scores.float().softmax(dim=-2).to(scores.dtype)
    return torch.matmul(probs.transpose(-1, -2), v)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, w = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
            o = _attend_keys_first(q, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(_merge_heads(o)), k, v


class Block(nn.Module):
    """Pre-norm residual self-attention + MLP block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, quick_gelu)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn(self.ln_1(x), mask=mask, past=past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, k, v


class CrossBlock(nn.Module):
    """Residual cross-attention (text queries, image keys/values) + MLP block.

    K/V are a separate projection so they can be computed once per image.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.heads = heads
        self.ln_1 = LayerNorm(width)
        self.ln_1_kv = LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, quick_gelu)

    def cross_kv(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, W]`` image tokens -> ``[2, B, heads, N, head_dim]``."""
        b, n, w = image_tokens.shape
        kv = self.kv(self.ln_1_kv(image_tokens)).view(b, n, 2, self.heads, w // self.heads)
        return kv.permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, step: bool = False) -> torch.Tensor:
        q = _split_heads(self.q(self.ln_1(x)), self.heads)
        if step:
            o = _attend_keys_first(q, kv[0], kv[1])
        else:
            o = F.scaled_dot_product_attention(q, kv[0], kv[1])
        x = x + self.out(_merge_heads(o))
        x = x + self.mlp(self.ln_2(x))
        return x


class AttentionalPooler(nn.Module):
    """Learned queries attend over the ViT tokens (open_clip's CoCa pooler)."""

    def __init__(self, dim: int, context_dim: int, heads: int, queries: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.empty(queries, dim))
        self.ln_q = LayerNorm(dim)
        self.ln_k = LayerNorm(context_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(context_dim, dim)
        self.v = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.q(self.ln_q(self.query)).unsqueeze(0).expand(x.shape[0], -1, -1)
        o = F.scaled_dot_product_attention(
            _split_heads(q, self.heads), _split_heads(self.k(x), self.heads), _split_heads(self.v(x), self.heads))
        return self.out(_merge_heads(o))


class ConvStem(nn.Module):
    """Convolutional branch of the patch embedding: two 3x3 stride-2 convolutions with GELU
    (``channels / 4``, then ``channels`` wide), then a ``patch_size / 4`` convolution to the
    ViT width. ``out`` starts at zero (``CoCa.init_parameters``), so the branch adds nothing
    until trained. The narrow first convolution is for speed: on a 2-core CPU, batch 64 at
    64 px, forward + backward took 10 ms with 8 -> 32 channels against 44 ms with 32 -> 32."""

    def __init__(self, channels: int, width: int, patch_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels // 4, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels // 4, channels, kernel_size=3, stride=2, padding=1)
        self.out = nn.Conv2d(channels, width, kernel_size=patch_size // 4, stride=patch_size // 4, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.conv2(F.gelu(self.conv1(pixels)))))


class VisionTower(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        vc = config.vision
        self.patch_embed = nn.Conv2d(3, vc.width, kernel_size=vc.patch_size, stride=vc.patch_size, bias=False)
        self.stem = ConvStem(vc.conv_stem, vc.width, vc.patch_size) if vc.conv_stem else None
        self.cls_token = nn.Parameter(torch.empty(vc.width))
        self.pos_embed = nn.Parameter(torch.empty(vc.grid * vc.grid + 1, vc.width))
        self.ln_pre = LayerNorm(vc.width)
        self.blocks = nn.ModuleList(
            Block(vc.width, vc.heads, vc.mlp_ratio, config.quick_gelu) for _ in range(vc.layers))
        self.pool = AttentionalPooler(config.embed_dim, vc.width, vc.attn_pooler_heads, vc.attn_pooler_queries)
        self.ln_post = LayerNorm(config.embed_dim)
        self.proj = nn.Parameter(torch.empty(config.embed_dim, config.embed_dim))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(pixels)
        if self.stem is not None:
            x = x + self.stem(pixels)
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            x, _, _ = block(x)
        x = self.ln_post(self.pool(x))
        return x[:, 0] @ self.proj, x[:, 1:]


class TextTower(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        tc = config.text
        self.config = tc
        self.pad_id = config.pad_token_id
        self.token_embedding = nn.Embedding(config.vocab_rows, tc.width)
        # Pruned vocabulary: token id -> embedding row (an id outside the subset reads the pad row).
        pad_row = config.vocab_subset.index(config.pad_token_id) if config.vocab_subset else 0
        self.register_buffer("token_rows", _subset_index(config, pad_row), persistent=False)
        self.cls_emb = nn.Parameter(torch.empty(tc.width))
        self.pos_embed = nn.Parameter(torch.empty(tc.context_length + 1, tc.width))
        self.blocks = nn.ModuleList(
            Block(tc.width, tc.heads, tc.mlp_ratio, config.quick_gelu) for _ in range(tc.layers))
        self.ln_final = LayerNorm(tc.width)
        self.proj = nn.Parameter(torch.empty(tc.width, config.embed_dim))

    def _mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Causal mask plus open_clip's key-padding mask over ``ids`` + CLS, ``[B, 1, L+1, L+1]``."""
        b, length = ids.shape
        n = length + 1
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        valid = ids != self.pad_id
        ones = torch.ones(b, 1, dtype=torch.bool, device=ids.device)
        # Legacy mode (what released CoCa weights use) shifts the key validity by one position.
        valid = torch.cat([valid, ones] if self.config.correct_cls_mask else [ones, valid], dim=1)
        return (causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of tokenizer ids (through the row map when the vocabulary is pruned)."""
        return self.token_embedding(ids if self.token_rows is None else self.token_rows[ids])

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full sequence (training / embedding): returns pooled CLS ``[B, E]`` and token states ``[B, L, W]``."""
        b, length = ids.shape
        if length > self.config.context_length:
            raise ContextLengthError(
                f"text has {length} tokens, the model's context length is {self.config.context_length}")
        x = self.embed(ids)
        x = torch.cat([x, self.cls_emb.view(1, 1, -1).expand(b, -1, -1).to(x.dtype)], dim=1)
        x = x + self.pos_embed[: length + 1].to(x.dtype)
        mask = self._mask(ids)
        for block in self.blocks:
            x, _, _ = block(x, mask=mask)
        pooled = self.ln_final(x[:, -1]) @ self.proj
        return pooled, x[:, :-1]

    def forward_cached(self, ids: torch.Tensor, past: "torch.Tensor | Sequence[KV]") -> tuple[torch.Tensor, list[KV]]:
        """New tokens only (no CLS), attending to ``past`` (stacked, or ``(K, V)`` per layer);
        returns token states and the present cache as ``(K, V)`` per layer."""
        s = ids.shape[1]
        p = _past_length(past)
        positions = torch.arange(s, device=ids.device) + p
        x = self.embed(ids) + F.embedding(positions, self.pos_embed).to(self.token_embedding.weight.dtype)
        mask = _step_mask(p, s, ids.device)
        present = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, mask=mask, past=past[i])
            present.append((k, v))
        return x, present


KV = tuple[torch.Tensor, torch.Tensor]


def _past_length(past: "torch.Tensor | Sequence[KV]") -> int:
    """Past length of a stacked ``[L, 2, B, H, past, D]`` cache or of ``(K, V)`` pairs."""
    return past[0][0].shape[2]


def stack_layers(pairs: Sequence[KV]) -> torch.Tensor:
    """``(K, V)`` per layer -> the stacked ``[L, 2, B, H, past, D]`` cache."""
    return torch.stack([torch.stack(kv) for kv in pairs])


def _step_mask(past: int, new: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[new, past + new]`` mask: every past key plus a causal block over the new tokens."""
    rows = torch.arange(new, device=device).unsqueeze(1) + past
    cols = torch.arange(past + new, device=device).unsqueeze(0)
    return cols <= rows


class MultimodalDecoder(nn.Module):
    def __init__(self, config: CoCaConfig):
        super().__init__()
        dc = config.decoder
        self.config = dc
        self.blocks = nn.ModuleList(
            Block(dc.width, dc.heads, dc.mlp_ratio, config.quick_gelu) for _ in range(dc.layers))
        self.cross = nn.ModuleList(
            CrossBlock(dc.width, dc.heads, dc.mlp_ratio, config.quick_gelu) for _ in range(dc.layers))
        self.ln_final = LayerNorm(dc.width)
        self.head = nn.Parameter(torch.empty(dc.width, config.vocab_rows))
        # Pruned vocabulary: token id -> head column, or the appended PRUNED_LOGIT column.
        self.register_buffer("logit_columns", _subset_index(config, config.vocab_rows), persistent=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final states -> logits over the whole token id space (PRUNED_LOGIT outside a subset)."""
        logits = hidden.to(self.head.dtype) @ self.head  # (an FP32 head in an FP16 model: FP32 logits)
        if self.logit_columns is None:
            return logits
        return F.pad(logits, (0, 1), value=PRUNED_LOGIT).index_select(-1, self.logit_columns)

    def cross_kv(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([blk.cross_kv(image_tokens) for blk in self.cross])

    def hidden(self, token_states: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Final normalised states of a full (teacher-forced) sequence, before the vocabulary head."""
        s = token_states.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=token_states.device).tril()
        x = token_states
        for i, (blk, xblk) in enumerate(zip(self.blocks, self.cross)):
            x, _, _ = blk(x, mask=mask)
            x = xblk(x, cross[i])
        return self.ln_final.normalize(x)

    def forward(self, token_states: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(token_states, cross))

    def forward_cached(self, token_states: torch.Tensor, past: "torch.Tensor | Sequence[KV]",
                       cross: "torch.Tensor | Sequence[KV]") -> tuple[torch.Tensor, list[KV]]:
        s = token_states.shape[1]
        mask = _step_mask(_past_length(past), s, token_states.device)
        x = token_states
        present = []
        for i, (blk, xblk) in enumerate(zip(self.blocks, self.cross)):
            x, k, v = blk(x, mask=mask, past=past[i])
            present.append((k, v))
            x = xblk(x, cross[i], step=True)
        return self.logits(self.ln_final.normalize(x)), present


class CoCa(nn.Module):
    """Contrastive Captioner: image tower, causal text tower, multimodal decoder."""

    def __init__(self, config: CoCaConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config)
        self.text = TextTower(config)
        self.decoder = MultimodalDecoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter (nothing is left as ``torch.empty``)."""
        def normal(t: torch.Tensor, std: float) -> None:
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

        for module in self.modules():
            if isinstance(module, nn.Linear):
                normal(module.weight, module.in_features ** -0.5)
                module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                normal(module.weight, (module.in_channels * module.kernel_size[0] * module.kernel_size[1]) ** -0.5)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal(module.weight, 0.02)
        if self.visual.stem is not None:
            self.visual.stem.out.weight.zero_()
        vw = self.config.vision.width
        normal(self.visual.cls_token, vw ** -0.5)
        normal(self.visual.pos_embed, vw ** -0.5)
        normal(self.visual.pool.query, 1.0)
        normal(self.visual.proj, self.config.embed_dim ** -0.5)
        normal(self.text.cls_emb, 0.01)
        normal(self.text.pos_embed, 0.01)
        normal(self.text.proj, self.config.text.width ** -0.5)
        normal(self.decoder.head, self.config.decoder.width ** -0.5)
        self.logit_scale.fill_(math.log(1 / 0.07))

    # -- contrastive towers -------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` -> (image_embed ``[B, E]``, image_tokens ``[B, Q-1, E]``)."""
        embed, tokens = self.visual(pixels)
        return (F.normalize(embed, dim=-1) if normalize else embed), tokens

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, L]`` token ids (padded) -> (text_embed ``[B, E]``, token_states ``[B, L, W]``)."""
        embed, states = self.text(ids)
        return (F.normalize(embed, dim=-1) if normalize else embed), states

    # -- captioning ---------------------------------------------------------------------
    def forward(self, images: torch.Tensor | None, text: torch.Tensor,
                image_embed: torch.Tensor | None = None,
                image_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training forward (teacher forcing): logits at position i predict ``text[:, i + 1]``."""
        if image_embed is None or image_tokens is None:
            image_embed, image_tokens = self.encode_image(images)
        text_embed, states = self.encode_text(text)
        logits = self.decoder(states[:, :-1], self.decoder.cross_kv(image_tokens))
        return {
            "image_features": image_embed,
            "text_features": text_embed,
            "logits": logits,
            "labels": text[:, 1:],
            "logit_scale": self.logit_scale.exp(),
        }

    def caption_logits(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Full-recompute logits for every position of an unpadded prefix (no cache)."""
        _, states = self.encode_text(ids)
        return self.decoder(states, self.decoder.cross_kv(image_tokens))

    # -- incremental decoding -----------------------------------------------------------
    def cross_kv(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder.cross_kv(image_tokens)

    def empty_cache(self, image_tokens: torch.Tensor) -> DecodeCache:
        """Cache with past length 0 and cross K/V computed once for these images."""
        b = image_tokens.shape[0]
        tc, dc = self.config.text, self.config.decoder
        dtype, device = image_tokens.dtype, image_tokens.device
        text = torch.zeros(tc.layers, 2, b, tc.heads, 0, tc.head_dim, dtype=dtype, device=device)
        dec = torch.zeros(dc.layers, 2, b, dc.heads, 0, dc.head_dim, dtype=dtype, device=device)
        return DecodeCache(text, dec, self.cross_kv(image_tokens))

    def decode_tensors(self, ids: torch.Tensor, past_text: torch.Tensor, past_decoder: torch.Tensor,
                       cross: torch.Tensor | Sequence[tuple[torch.Tensor, torch.Tensor]],
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step over ``S`` new tokens with stacked caches (``decode_layers`` stacked).

        ``cross`` is the stacked ``[L, 2, B, H, N, D]`` tensor or, per layer, its ``(K, V)`` pair.
        """
        logits, text, dec = self.decode_layers(ids, past_text, past_decoder, cross)
        return logits, stack_layers(text), stack_layers(dec)

    def decode_layers(self, ids: torch.Tensor, past_text: "torch.Tensor | Sequence[KV]",
                      past_decoder: "torch.Tensor | Sequence[KV]", cross: "torch.Tensor | Sequence[KV]",
                      ) -> tuple[torch.Tensor, list[KV], list[KV]]:
        """One decode step over ``S`` new tokens; the graph exported as ``decoder``.

        Caches and ``cross`` are stacked tensors or ``(K, V)`` per layer (what the exported
        graph takes, so ONNX Runtime never slices a stacked input nor stacks the presents);
        the presents come back as ``(K, V)`` per layer.
        """
        states, present_text = self.text.forward_cached(ids, past_text)
        logits, present_decoder = self.decoder.forward_cached(states, past_decoder, cross)
        return logits, present_text, present_decoder

    def decode_step(self, ids: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        total = cache.past_length + ids.shape[1]
        if total > self.config.context_length:
            raise ContextLengthError(
                f"decoding to {total} tokens exceeds the model's context length {self.config.context_length}")
        logits, text, dec = self.decode_tensors(ids, cache.text, cache.decoder, cache.cross)
        return logits, DecodeCache(text, dec, cache.cross)


def half_with_fp32_blocks(model: CoCa) -> CoCa:
    """``model`` in FP16 except what an FP16 bundle keeps in FP32 (``quantize.Fp16Config``'s
    block list): every LayerNorm and the decoder's vocabulary head. Attention softmax
    accumulates in FP32 (SDPA's fused kernels; ``_attend_keys_first`` upcasts). Real FP16 arithmetic
    everywhere else, so this measures what FP16 deployment costs."""
    model.half()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    model.decoder.head.data = model.decoder.head.data.float()
    return model
