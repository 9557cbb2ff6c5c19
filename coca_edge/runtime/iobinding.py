"""Device-resident decoding for ONNX Runtime: the K/V caches stay where the session computes.

The numpy loop (:func:`coca_edge.runtime.generation.generate`) hands the decoder host arrays
and gets host arrays back, so on CUDA (or TensorRT's execution provider) every step copies
the whole self-attention cache and every layer's cross K/V over PCIe twice. Here the
caches and the cross K/V are ``OrtValue`` s bound with IO binding: ``present_*`` outputs are
allocated on the device and bound as the next step's ``past_*``; the cross K/V are
uploaded once per batch of images. Only the token ids go up and the last-position logits
come down each step.

Rows that finish (greedy / sampling) and beam reordering need a gather of cache rows; that
runs on the device too, in a one-node ONNX ``Gather`` session on the decoder's providers
(built with ``onnx.helper``; onnx comes with the ORT extras).

Token choice is the numpy loop's own code (``_pick``, ``_log_softmax``, ``_top_candidates``),
so both loops give the same tokens (tested on the CPU provider).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .generation import (DecoderLayout, GenerationConfig, GenerationOutput, _log_softmax, _pick,
                         _top_candidates)
from .runners import OrtRunner

__all__ = ["IoBindingGenerator"]

_ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}


class IoBindingGenerator:
    """Caption generation over an :class:`OrtRunner` decoder with device-resident caches.

    ``device`` is where the caches live: ``"cuda"`` when the session runs on CUDA or TensorRT,
    else ``"cpu"`` (where IO binding only saves the per-step feed/fetch copies).
    """

    def __init__(self, decoder: OrtRunner, device: str | None = None, device_id: int = 0):
        self.decoder = decoder
        self.session = decoder.session
        providers = self.session.get_providers()
        self.device = device or ("cuda" if providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                 else "cpu")
        self.device_id = device_id
        self._gathers: dict[tuple, object] = {}

    # -- device helpers ------------------------------------------------------------------
    def _upload(self, array: np.ndarray):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, self.device_id)

    def _gather_session(self, dtype: np.dtype, count: int, rank: int, axis: int):
        key = (np.dtype(dtype), count, rank, axis)
        if key not in self._gathers:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper

            elem = _ONNX_TYPES[np.dtype(dtype)]
            dims = [f"d{i}" for i in range(rank)]
            nodes = [helper.make_node("Gather", [f"x{i}", "index"], [f"y{i}"], axis=axis) for i in range(count)]
            graph = helper.make_graph(
                nodes, "gather_rows",
                [helper.make_tensor_value_info(f"x{i}", elem, dims) for i in range(count)]
                + [helper.make_tensor_value_info("index", TensorProto.INT64, ["n"])],
                [helper.make_tensor_value_info(f"y{i}", elem, dims[:axis] + ["n"] + dims[axis + 1:])
                 for i in range(count)])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            model.ir_version = 8  # readable by every ORT the runtime supports
            onnx.checker.check_model(model)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._gathers[key] = ort.InferenceSession(model.SerializeToString(), options,
                                                      providers=self.session.get_providers())
        return self._gathers[key]

    def _gather(self, values: Sequence, index: np.ndarray, axis: int, dtype: np.dtype, rank: int) -> list:
        session = self._gather_session(dtype, len(values), rank, axis)
        io = session.io_binding()
        for i, value in enumerate(values):
            io.bind_ortvalue_input(f"x{i}", value)
        io.bind_cpu_input("index", np.ascontiguousarray(index, dtype=np.int64))
        for i in range(len(values)):
            io.bind_output(f"y{i}", self.device, self.device_id)
        session.run_with_iobinding(io)
        return list(io.get_outputs())

    def _step(self, ids: np.ndarray, past: Sequence, cross: Sequence):
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        io.bind_ortvalue_input("past_text", past[0])
        io.bind_ortvalue_input("past_decoder", past[1])
        for name, value in zip(self._cross_names, cross):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        io.bind_output("present_text", self.device, self.device_id)
        io.bind_output("present_decoder", self.device, self.device_id)
        self.session.run_with_iobinding(io)
        logits, present_text, present_decoder = io.get_outputs()
        return logits.numpy()[:, -1, :], (present_text, present_decoder)

    # -- generation ----------------------------------------------------------------------
    def generate(self, cross_kv: np.ndarray, layout: DecoderLayout,
                 config: GenerationConfig = GenerationConfig()) -> GenerationOutput:
        """Same contract and tokens as :func:`coca_edge.runtime.generation.generate`."""
        if 1 + config.max_new_tokens > layout.context_length:
            raise ValueError(f"max_new_tokens={config.max_new_tokens} plus the start token exceeds the model's "
                             f"context length {layout.context_length}")
        if cross_kv.ndim != 6 or cross_kv.shape[2] == 0:
            raise ValueError(f"cross_kv must be [layers, 2, batch>0, heads, tokens, head_dim], got {cross_kv.shape}")
        self._cross_names = [f"cross_{kv}_{i}" for i in range(cross_kv.shape[0]) for kv in ("k", "v")]
        if config.strategy == "beam" and config.num_beams > 1:
            return self._beam_search(cross_kv, layout, config)
        return self._sample(cross_kv, layout, config)

    def _upload_cross(self, cross: np.ndarray) -> list:
        return [self._upload(cross[i, j]) for i in range(cross.shape[0]) for j in range(2)]

    def _reorder_past(self, present: Sequence, index: np.ndarray, dtype: np.dtype) -> list:
        return self._gather(present, index, axis=2, dtype=dtype, rank=6)

    def _sample(self, cross: np.ndarray, layout: DecoderLayout, config: GenerationConfig) -> GenerationOutput:
        batch, dtype = cross.shape[2], cross.dtype
        rng = np.random.default_rng(config.seed)
        active = np.arange(batch)
        past = [self._upload(p) for p in layout.empty_past(batch, dtype)]
        cross_values = self._upload_cross(cross)
        ids = np.full((batch, 1), layout.sot_token_id, dtype=np.int64)
        sequences: list[list[int]] = [[] for _ in range(batch)]
        for step in range(config.max_new_tokens):
            logits, present = self._step(ids, past, cross_values)
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
                rows = np.flatnonzero(keep)
                present = self._reorder_past(present, rows, dtype)
                cross_values = self._gather(cross_values, rows, axis=0, dtype=dtype, rank=4)
                active, tokens = active[keep], tokens[keep]
            past = present
            ids = tokens.astype(np.int64)[:, None]
        return GenerationOutput(sequences)

    def _beam_search(self, cross: np.ndarray, layout: DecoderLayout, config: GenerationConfig) -> GenerationOutput:
        """The numpy loop's beam search (see ``generation._beam_search``) with the caches on the device."""
        nb = config.num_beams
        batch, dtype = cross.shape[2], cross.dtype
        cross_values = self._upload_cross(np.repeat(cross, nb, axis=2))
        past = [self._upload(p) for p in layout.empty_past(batch * nb, dtype)]
        scores = np.full((batch, nb), -1e9)
        scores[:, 0] = 0.0
        seqs: list[list[int]] = [[] for _ in range(batch * nb)]
        hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        ids = np.full((batch * nb, 1), layout.sot_token_id, dtype=np.int64)
        for step in range(config.max_new_tokens):
            logits, present = self._step(ids, past, cross_values)
            logp = _log_softmax(logits)
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
                kept = 0
                for rank, flat in enumerate(_top_candidates(cand[b], 2 * nb)):
                    beam, token, score = int(flat // vocab), int(flat % vocab), float(cand[b, flat])
                    if token == layout.eot_token_id:
                        if rank < nb:
                            hyps[b].append((score / (step + 1) ** config.length_penalty,
                                            seqs[b * nb + beam] + [token]))
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
            past = self._reorder_past(present, select, dtype)
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
