"""Caption generation over the KV-cached decoder graph, in numpy (torch-free).

Written once against a :class:`~coca_edge.runtime.runners.Runner` for the ``decoder``
graph, so ONNX Runtime, TensorRT and the PyTorch reference all decode through this loop.

Cache handling: the decoder graph returns ``present = concat(past, new)`` and the loop
feeds it back as the next ``past`` unchanged, one ``[batch, heads, past, head_dim]`` array
per layer and K / V (``past_text_k_0`` ... ``present_decoder_v_{L-1}``). Bundles exported
before that layout take one stacked ``[layers, 2, batch, heads, past, head_dim]`` array per
tower (``past_text`` / ``past_decoder``); ``DecoderLayout.stacked_cache`` says which a
graph has, and everything here handles both. ONNX Runtime's CPU provider reads numpy
inputs in place and allocates outputs once per run, so no extra host copy of the cache is
made per step; rows that finish (greedy/sampling) are dropped from the batch, and beam
search gathers the cache rows of the surviving beams (one copy, only of what survives).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .runners import Runner

__all__ = ["GenerationConfig", "DecoderLayout", "GenerationOutput", "HostState", "generate", "generate_with",
           "decoder_feed", "cache_names", "fit_cache_feed", "STRATEGIES"]

STRATEGIES = ("greedy", "beam", "top_k", "top_p")


@dataclass(frozen=True)
class GenerationConfig:
    strategy: str = "greedy"
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 3
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


TOWERS = ("text", "decoder")


def cache_names(kind: str, tower: str, layers: int) -> list[str]:
    """Per-layer cache tensors of a tower: ``{kind}_{tower}_k_0``, ``{kind}_{tower}_v_0``, ...
    (``kind`` is ``past`` for decoder inputs, ``present`` for its outputs)."""
    return [f"{kind}_{tower}_{kv}_{i}" for i in range(layers) for kv in ("k", "v")]


def _is_stacked(names: Sequence[str]) -> bool:
    return "past_text" in names


def fit_cache_feed(feed: Mapping[str, np.ndarray], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``feed`` with its cache tensors in the layout a graph with ``input_names`` takes:
    per-layer arrays stacked (``past_text``) or a stacked array split into per-layer views
    (numpy, or torch tensors for the split). A feed already in that layout comes back as it is."""
    feed = dict(feed)
    if _is_stacked(input_names) and "past_text" not in feed and "past_text_k_0" in feed:
        for tower in TOWERS:
            names = [n for n in feed if n.startswith(f"past_{tower}_")]
            layers = len(names) // 2
            feed[f"past_{tower}"] = np.stack([np.stack([feed.pop(f"past_{tower}_k_{i}"), feed.pop(f"past_{tower}_v_{i}")])
                                              for i in range(layers)])
    elif not _is_stacked(input_names) and "past_text" in feed:
        for tower in TOWERS:
            stacked = feed.pop(f"past_{tower}")
            for i in range(stacked.shape[0]):
                feed[f"past_{tower}_k_{i}"], feed[f"past_{tower}_v_{i}"] = stacked[i, 0], stacked[i, 1]
    return feed


@dataclass(frozen=True)
class DecoderLayout:
    """What the loop needs to know about the decoder graph (from a bundle's config.json, and
    ``stacked_cache`` from the graph's input names: ``for_inputs``)."""

    text_layers: int
    text_heads: int
    text_head_dim: int
    decoder_layers: int
    decoder_heads: int
    decoder_head_dim: int
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int
    context_length: int
    vocab_size: int
    # the decoder graph takes the pre-per-layer stacked cache (past_text / past_decoder)
    stacked_cache: bool = False

    @classmethod
    def from_model_config(cls, model: Mapping[str, Any]) -> "DecoderLayout":
        t, d = model["text"], model["decoder"]
        return cls(t["layers"], t["heads"], t["width"] // t["heads"], d["layers"], d["heads"],
                   d["width"] // d["heads"], model["sot_token_id"], model["eot_token_id"], model["pad_token_id"],
                   t["context_length"], t["vocab_size"])

    def for_inputs(self, input_names: Sequence[str]) -> "DecoderLayout":
        """This layout for a decoder graph with these input names (stacked or per-layer cache)."""
        stacked = _is_stacked(input_names)
        return self if stacked == self.stacked_cache else replace(self, stacked_cache=stacked)

    @property
    def batch_axis(self) -> int:
        """Batch axis of each cache array."""
        return 2 if self.stacked_cache else 0

    def _towers(self):
        return (("text", self.text_layers, self.text_heads, self.text_head_dim),
                ("decoder", self.decoder_layers, self.decoder_heads, self.decoder_head_dim))

    @cached_property
    def _past_names(self) -> tuple[str, ...]:
        if self.stacked_cache:
            return tuple(f"past_{tower}" for tower in TOWERS)
        return tuple(n for tower, layers, _, _ in self._towers() for n in cache_names("past", tower, layers))

    @cached_property
    def _present_of_past(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, "present" + name[4:]) for name in self._past_names)

    def past_names(self) -> list[str]:
        """The decoder graph's cache inputs, in graph order."""
        return list(self._past_names)

    def empty_past(self, batch: int, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
        """The first step's cache (past length 0), by decoder input name."""
        if self.stacked_cache:
            return {f"past_{tower}": np.zeros((layers, 2, batch, heads, 0, dim), dtype)
                    for tower, layers, heads, dim in self._towers()}
        empty = {}
        for tower, layers, heads, dim in self._towers():
            for name in cache_names("past", tower, layers):
                empty[name] = np.zeros((batch, heads, 0, dim), dtype)
        return empty

    def next_past(self, outputs: Mapping[str, Any]) -> dict[str, Any]:
        """A step's ``present_*`` outputs as the next step's ``past_*`` inputs (no copy)."""
        return {past: outputs[present] for past, present in self._present_of_past}

    def select_past(self, past: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """These batch rows of the cache (one copy of what is kept)."""
        axis = self.batch_axis
        return {name: np.take(value, rows, axis=axis) for name, value in past.items()}

    def stack_past(self, past: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The cache as stacked ``[layers, 2, batch, heads, past, head_dim]`` arrays (text,
        decoder), whatever the graph's layout: what validation compares."""
        stacked = fit_cache_feed(past, ("past_text",))
        return stacked["past_text"], stacked["past_decoder"]


@dataclass
class GenerationOutput:
    """Per image: generated ids (no start token; the end token included when it was produced)."""

    sequences: list[list[int]]
    scores: list[float] = field(default_factory=list)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def decoder_feed(ids: np.ndarray, past: Mapping[str, np.ndarray], cross: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder graph inputs: ``past`` by input name (``DecoderLayout.empty_past`` / ``next_past``);
    ``cross`` ``[L, 2, B, H, N, D]`` goes in as per-layer K and V views (``cross_k_i`` /
    ``cross_v_i``): contiguous, so no copy of the image K/V is made per step."""
    feed = {"input_ids": ids, **past}
    for i in range(cross.shape[0]):
        feed[f"cross_k_{i}"] = cross[i, 0]
        feed[f"cross_v_{i}"] = cross[i, 1]
    return feed


class HostState:
    """The decoder's state for the numpy loop: host arrays fed to ``decoder.run`` each step.

    ``repeat`` copies each image's cross K/V for its beams. Another state (device-resident
    caches, ``runtime.iobinding``) plugs into the same loops by offering ``step`` and ``select``.
    """

    def __init__(self, decoder: Runner, cross: np.ndarray, layout: DecoderLayout, repeat: int = 1):
        self.decoder = decoder
        self.layout = layout.for_inputs(decoder.input_names)
        self.cross = np.repeat(cross, repeat, axis=2) if repeat > 1 else cross
        self.past = self.layout.empty_past(self.cross.shape[2], cross.dtype)

    def step(self, ids: np.ndarray) -> np.ndarray:
        """Run one step; returns the last position's logits and keeps ``present`` as the next past."""
        out = self.decoder.run(decoder_feed(ids, self.past, self.cross))
        self.past = self.layout.next_past(out)
        return out["logits"][:, -1, :]

    def select(self, rows: np.ndarray, cross: bool) -> None:
        """Keep (or reorder to) these batch rows of the cache, and of the cross K/V if ``cross``."""
        self.past = self.layout.select_past(self.past, rows)
        if cross:
            self.cross = self.cross[:, :, rows]


def generate(decoder: Runner, cross_kv: np.ndarray, layout: DecoderLayout,
             config: GenerationConfig = GenerationConfig()) -> GenerationOutput:
    """Generate captions for the images whose cross-attention K/V is ``cross_kv`` ``[L, 2, B, H, N, D]``."""
    return generate_with(lambda repeat: HostState(decoder, cross_kv, layout, repeat), cross_kv, layout, config)


def generate_with(make_state: Callable[[int], Any], cross_kv: np.ndarray, layout: DecoderLayout,
                  config: GenerationConfig = GenerationConfig()) -> GenerationOutput:
    """The generation loops over any decoder state: ``make_state(repeat)`` returns an object with
    ``step(ids) -> logits`` and ``select(rows, cross)`` (see ``HostState``)."""
    if 1 + config.max_new_tokens > layout.context_length:
        raise ValueError(f"max_new_tokens={config.max_new_tokens} plus the start token exceeds the model's "
                         f"context length {layout.context_length}")
    if cross_kv.ndim != 6 or cross_kv.shape[2] == 0:
        raise ValueError(f"cross_kv must be [layers, 2, batch>0, heads, tokens, head_dim], got {cross_kv.shape}")
    batch = cross_kv.shape[2]
    if config.strategy == "beam" and config.num_beams > 1:
        return _beam_search(make_state(config.num_beams), batch, layout, config)
    return _sample(make_state(1), batch, layout, config)


def _pick(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    if config.strategy in ("greedy", "beam"):
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / config.temperature
    if config.strategy == "top_k":
        k = min(config.top_k, scaled.shape[-1])
        kth = np.partition(scaled, -k, axis=-1)[:, -k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    else:
        order = np.argsort(-scaled, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(scaled, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        remove = np.cumsum(probs, axis=-1) - probs >= config.top_p
        sorted_logits[remove] = -np.inf
        scaled = np.full_like(scaled, -np.inf)
        np.put_along_axis(scaled, order, sorted_logits, axis=-1)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs])


def _sample(state: Any, batch: int, layout: DecoderLayout, config: GenerationConfig) -> GenerationOutput:
    rng = np.random.default_rng(config.seed)
    active = np.arange(batch)
    ids = np.full((batch, 1), layout.sot_token_id, dtype=np.int64)
    sequences: list[list[int]] = [[] for _ in range(batch)]
    for step in range(config.max_new_tokens):
        logits = state.step(ids)
        if step < config.min_new_tokens:
            logits = logits.copy()
            logits[:, layout.eot_token_id] = -np.inf
        tokens = _pick(logits, config, rng)
        for row, token in zip(active, tokens):
            sequences[row].append(int(token))
        keep = tokens != layout.eot_token_id
        if not keep.any() or step + 1 == config.max_new_tokens:
            break
        if not keep.all():
            state.select(np.flatnonzero(keep), cross=True)
            active, tokens = active[keep], tokens[keep]
        ids = tokens.astype(np.int64)[:, None]
    return GenerationOutput(sequences)


def _beam_search(state: Any, batch: int, layout: DecoderLayout, config: GenerationConfig) -> GenerationOutput:
    """Beam search; a hypothesis' score is its summed log-probability / (tokens ** length_penalty).

    Per step the 2 * num_beams best continuations are ranked (ties by token index); an end
    token ranked within the first num_beams closes a hypothesis, the best num_beams others
    continue. An image is done once it holds num_beams closed hypotheses.
    """
    nb = config.num_beams
    scores = np.full((batch, nb), -1e9)
    scores[:, 0] = 0.0  # only one live beam at the start, so beams do not duplicate
    seqs: list[list[int]] = [[] for _ in range(batch * nb)]
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    ids = np.full((batch * nb, 1), layout.sot_token_id, dtype=np.int64)
    for step in range(config.max_new_tokens):
        logp = _log_softmax(state.step(ids))
        if step < config.min_new_tokens:
            logp[:, layout.eot_token_id] = -np.inf
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(batch, nb * vocab)
        select = np.zeros(batch * nb, dtype=np.int64)
        next_tokens = np.full(batch * nb, layout.pad_token_id, dtype=np.int64)
        next_scores = scores.copy()
        for b in range(batch):
            if done[b]:
                select[b * nb:(b + 1) * nb] = np.arange(b * nb, (b + 1) * nb)
                continue
            top = _top_candidates(cand[b], 2 * nb)
            kept = 0
            for rank, flat in enumerate(top):
                beam, token, score = int(flat // vocab), int(flat % vocab), float(cand[b, flat])
                if token == layout.eot_token_id:
                    if rank < nb:
                        hyps[b].append((score / (step + 1) ** config.length_penalty, seqs[b * nb + beam] + [token]))
                    continue
                select[b * nb + kept] = b * nb + beam
                next_tokens[b * nb + kept] = token
                next_scores[b, kept] = score
                kept += 1
                if kept == nb:
                    break
            if len(hyps[b]) >= nb:
                done[b] = True
        seqs = [seqs[s] + [int(t)] for s, t in zip(select, next_tokens)]
        scores = next_scores
        if done.all() or step + 1 == config.max_new_tokens:
            break
        state.select(select, cross=False)  # beams stay within their image: its cross K/V is unchanged
        ids = next_tokens[:, None]
    out, best_scores = [], []
    length = config.max_new_tokens
    for b in range(batch):
        if not done[b]:
            for k in range(nb):
                hyps[b].append((scores[b, k] / length ** config.length_penalty, seqs[b * nb + k]))
        score, tokens = max(hyps[b], key=lambda h: h[0])
        out.append(tokens)
        best_scores.append(float(score))
    return GenerationOutput(out, best_scores)


def _top_candidates(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, best first, ties broken by smaller index."""
    k = min(k, row.size)
    part = np.argpartition(-row, k - 1)[:k]
    return part[np.lexsort((part, -row[part]))]
