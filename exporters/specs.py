"""One declarative spec per exported graph.

A spec names the graph's inputs and outputs with symbolic axes, builds the module that
``torch.onnx.export`` traces, makes dummy inputs for any (batch, sequence, past) and carries
a tolerance per output. Export, validation, the bundle manifest and calibration all read
these specs, so graph IO names are defined here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coca_edge.models import CoCa, CoCaConfig
from coca_edge.models.coca import stack_layers
from coca_edge.runtime.generation import cache_names

__all__ = ["TensorSpec", "GraphSpec", "GRAPH_NAMES", "CACHE_LAYOUTS", "graph_specs", "get_spec",
           "cross_input_names", "split_cross"]

GRAPH_NAMES = ("image_encoder", "text_encoder", "cross_kv", "decoder")
# The decoder's self-attention cache I/O: one tensor per layer and K / V (the default), or the
# stacked [layers, 2, batch, heads, past, head_dim] per tower of bundles exported before it
# (still loaded and run; exported only for comparison: benchmarks/cache_layout.py).
CACHE_LAYOUTS = ("per-layer", "stacked")


@dataclass(frozen=True)
class TensorSpec:
    """Graph input/output: name, dtype and shape (ints are fixed, strings are symbolic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable[[CoCa], nn.Module]
    # max-abs tolerance per output for ORT FP32 vs PyTorch FP32 (see _TOLERANCE for the source)
    tolerance: dict[str, float] = field(default_factory=dict)
    # what validation compares the graph with; None: the traced module itself. Set where the
    # traced module computes the model's values a different way (e.g. folded weights).
    reference: Callable[[CoCa], nn.Module] | None = None

    def reference_module(self, model: CoCa) -> nn.Module:
        return (self.reference or self.build)(model)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dims(self, config: CoCaConfig, batch: int, seq: int = 1, past: int = 0) -> dict[str, int]:
        return {"batch": batch, "seq": seq, "past": past, "total": past + seq,
                "text_len": seq}

    def dummy_inputs(self, config: CoCaConfig, batch: int = 2, seq: int = 3, past: int = 2,
                     seed: int = 0) -> dict[str, torch.Tensor]:
        """Random inputs with the requested symbolic sizes (token ids in the vocabulary)."""
        g = torch.Generator().manual_seed(seed)
        sizes = self.dims(config, batch, seq, past)
        feed = {}
        for spec in self.inputs:
            shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
            if spec.dtype == "int64":
                ids = torch.randint(1, config.sot_token_id, shape, generator=g)
                if spec.name == "input_ids" and self.name == "text_encoder":
                    ids[:, 0] = config.sot_token_id
                    ids[:, -1] = config.eot_token_id
                feed[spec.name] = ids
            else:
                feed[spec.name] = torch.randn(shape, generator=g)
        return feed


class _CrossKVProjection(nn.Module):
    """Every decoder layer's cross-attention K/V as one broadcast MatMul.

    Same values as ``CoCa.cross_kv`` (per layer: LayerNorm, K/V projection, head split,
    then a stack), computed so that ONNX Runtime neither transposes nor concatenates: the
    LayerNorm is normalised once and each layer's scale and shift are folded into its
    weights and bias, the bias rides along as an extra input row of ones, and the MatMul's
    output is already ``[L, 2, B, H, N, D]``. Measured on ``coca_ViT-B-32`` (ORT CPU,
    2 threads): 121 vs 142 ms at batch 8 (1.17x), 16.5 vs 17.0 ms at batch 1, against the
    per-layer form (``benchmarks/decode_levers.py --sections crosskv``).
    """

    def __init__(self, model: CoCa):
        super().__init__()
        blocks = list(model.decoder.cross)
        eps = {blk.ln_1_kv.eps for blk in blocks}
        if len(eps) != 1:
            raise ValueError(f"cross-attention LayerNorms differ in eps {sorted(eps)}")
        self.eps = eps.pop()
        self.width = blocks[0].kv.weight.shape[1]
        weights = []
        with torch.no_grad():
            for blk in blocks:
                w, bias = blk.kv.weight.float(), blk.kv.bias.float()          # [2W, W], [2W]
                scale, shift = blk.ln_1_kv.weight.float(), blk.ln_1_kv.bias.float()
                width, heads = w.shape[1], blk.heads
                folded = (w * scale).view(2, heads, width // heads, width).transpose(-1, -2)  # [2, H, W, D]
                row = (w @ shift + bias).view(2, heads, 1, width // heads)                  # [2, H, 1, D]
                weights.append(torch.cat([folded, row], dim=2))
        self.register_buffer("weight", torch.stack(weights).unsqueeze(2).contiguous())  # [L, 2, 1, H, W+1, D]

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        n = F.layer_norm(image_tokens, (self.width,), eps=self.eps)
        n = torch.cat([n, torch.ones_like(n[..., :1])], dim=-1)  # [B, N, W+1]
        return torch.matmul(n[:, None], self.weight)


class _ModelCrossKV(nn.Module):
    """The model's own cross K/V: the validation reference for ``_CrossKVProjection``."""

    def __init__(self, model: CoCa):
        super().__init__()
        self.model = model

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.model.cross_kv(image_tokens)


class _ImageEncoder(nn.Module):
    def __init__(self, model: CoCa, fuse_cross_kv: bool, reference: bool = False):
        super().__init__()
        self.model = model
        self.cross_kv = None
        if fuse_cross_kv:
            self.cross_kv = _ModelCrossKV(model) if reference else _CrossKVProjection(model)

    def forward(self, pixel_values: torch.Tensor):
        embed, tokens = self.model.encode_image(pixel_values)
        if self.cross_kv is not None:
            return embed, tokens, self.cross_kv(tokens)
        return embed, tokens


class _TextEncoder(nn.Module):
    def __init__(self, model: CoCa):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model.encode_text(input_ids)[0]


def _pairs(flat) -> list:
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]


class _Decoder(nn.Module):
    """Caches and cross-attention K/V arrive as separate per-layer K and V inputs, and the
    presents leave the same way: slicing one stacked input in the graph would copy all of it
    (Split) on every step - measured 27% of a batch-8 step for the cross K/V - and stacking the
    presents back costs a Concat (the self-attention caches: 1.09-1.13x on the INT8 batch-8
    step, ``benchmarks/cache_layout.py``). ``stacked=True`` is the earlier stacked cache I/O."""

    def __init__(self, model: CoCa, stacked: bool = False):
        super().__init__()
        self.model = model
        self.stacked = stacked
        self.text_layers = model.config.text.layers
        self.decoder_layers = model.config.decoder.layers

    def forward(self, input_ids, *flat):
        if self.stacked:
            past_text, past_decoder, cross = flat[0], flat[1], flat[2:]
        else:
            t, d = 2 * self.text_layers, 2 * self.decoder_layers
            past_text, past_decoder, cross = _pairs(flat[:t]), _pairs(flat[t:t + d]), flat[t + d:]
        logits, text, dec = self.model.decode_layers(input_ids, past_text, past_decoder, _pairs(cross))
        if self.stacked:
            return logits, stack_layers(text), stack_layers(dec)
        return (logits, *[x for kv in text for x in kv], *[x for kv in dec for x in kv])


# Tolerances: ORT FP32 vs PyTorch FP32 differ by kernel summation order. Observed max-abs on
# coca_ViT-B-32 with random weights: embeddings ~1e-6, image tokens ~5e-6, logits and K/V
# ~8e-6 (see tests/parity/test_export_parity.py); the margins below are ~5x that.
_TOLERANCE = {"embed": 5e-5, "states": 1e-4, "logits": 1e-4}


def _cache_specs(config: CoCaConfig, stacked: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The decoder's cache inputs (``past``) and outputs (``present``)."""
    towers = (("text", config.text), ("decoder", config.decoder))
    if stacked:
        return tuple(tuple(TensorSpec(f"{kind}_{tower}", "float32", (c.layers, 2, "batch", c.heads, axis, c.head_dim))
                           for tower, c in towers) for kind, axis in (("past", "past"), ("present", "total")))
    return tuple(tuple(TensorSpec(name, "float32", ("batch", c.heads, axis, c.head_dim))
                       for tower, c in towers for name in cache_names(kind, tower, c.layers))
                 for kind, axis in (("past", "past"), ("present", "total")))


def graph_specs(config: CoCaConfig, fuse_cross_kv: bool = False, cache_layout: str = "per-layer") -> dict[str, GraphSpec]:
    if cache_layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache_layout must be one of {', '.join(CACHE_LAYOUTS)}, got {cache_layout!r}")
    stacked = cache_layout == "stacked"
    past, present = _cache_specs(config, stacked)
    dc, vc = config.decoder, config.vision
    n = vc.num_image_tokens
    cross = TensorSpec("cross_kv", "float32", (dc.layers, 2, "batch", dc.heads, n, dc.head_dim))
    cross_per_layer = tuple(TensorSpec(name, "float32", ("batch", dc.heads, n, dc.head_dim))
                            for name in cross_input_names(dc.layers))
    image_outputs = [TensorSpec("image_embed", "float32", ("batch", config.embed_dim)),
                     TensorSpec("image_tokens", "float32", ("batch", n, config.embed_dim))]
    if fuse_cross_kv:
        image_outputs.append(cross)
    specs = [
        GraphSpec(
            "image_encoder",
            (TensorSpec("pixel_values", "float32", ("batch", 3, vc.image_size, vc.image_size)),),
            tuple(image_outputs),
            lambda m: _ImageEncoder(m, fuse_cross_kv),
            {"image_embed": _TOLERANCE["embed"], "image_tokens": _TOLERANCE["states"],
             "cross_kv": _TOLERANCE["states"]},
            lambda m: _ImageEncoder(m, fuse_cross_kv, reference=True),
        ),
        GraphSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int64", ("batch", "text_len")),),
            (TensorSpec("text_embed", "float32", ("batch", config.embed_dim)),),
            _TextEncoder,
            {"text_embed": _TOLERANCE["embed"]},
        ),
        GraphSpec(
            "cross_kv",
            (TensorSpec("image_tokens", "float32", ("batch", n, config.embed_dim)),),
            (cross,),
            _CrossKVProjection,
            {"cross_kv": _TOLERANCE["states"]},
            _ModelCrossKV,
        ),
        GraphSpec(
            "decoder",
            (TensorSpec("input_ids", "int64", ("batch", "seq")), *past, *cross_per_layer),
            (TensorSpec("logits", "float32", ("batch", "seq", config.vocab_size)), *present),
            lambda m: _Decoder(m, stacked),
            {"logits": _TOLERANCE["logits"], **{t.name: _TOLERANCE["states"] for t in present}},
        ),
    ]
    return {s.name: s for s in specs}


def cross_input_names(layers: int) -> list[str]:
    """Decoder inputs holding ``cross_kv[i, 0]`` (K) and ``cross_kv[i, 1]`` (V) of layer i."""
    return [f"cross_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]


def split_cross(cross_kv, layers: int) -> dict:
    """``[L, 2, B, H, N, D]`` -> the decoder's per-layer inputs (views, no copy; numpy or torch)."""
    return {f"cross_{kv}_{i}": cross_kv[i, j] for i in range(layers) for j, kv in enumerate(("k", "v"))}


def get_spec(config: CoCaConfig, name: str, fuse_cross_kv: bool = False, cache_layout: str = "per-layer") -> GraphSpec:
    specs = graph_specs(config, fuse_cross_kv, cache_layout)
    if name not in specs:
        raise ValueError(f"unknown graph {name!r}; graphs are {', '.join(GRAPH_NAMES)}")
    return specs[name]
