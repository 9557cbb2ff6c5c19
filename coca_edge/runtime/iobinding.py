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

The loops themselves (greedy / sampling / beam search) are the numpy loop's own
(``generation.generate_with``); this module only supplies the decoder state they drive
(``_DeviceState``: ``step`` and ``select``), so both give the same tokens (tested on the CPU
provider).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .generation import DecoderLayout, GenerationConfig, GenerationOutput, generate_with
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

    def _step(self, ids: np.ndarray, past: Sequence, past_names: Sequence[str], cross: Sequence,
              cross_names: Sequence[str]):
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        for name, value in zip(past_names, past):
            io.bind_ortvalue_input(name, value)
        for name, value in zip(cross_names, cross):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in past_names:
            io.bind_output("present" + name[4:], self.device, self.device_id)
        self.session.run_with_iobinding(io)
        logits, *present = io.get_outputs()
        return logits.numpy()[:, -1, :], present

    # -- generation ----------------------------------------------------------------------
    def generate(self, cross_kv: np.ndarray, layout: DecoderLayout,
                 config: GenerationConfig = GenerationConfig()) -> GenerationOutput:
        """Same contract and tokens as :func:`coca_edge.runtime.generation.generate`."""
        return generate_with(lambda repeat: _DeviceState(self, cross_kv, layout, repeat), cross_kv, layout, config)


class _DeviceState:
    """``generation.HostState`` with the caches and cross K/V as device ``OrtValue`` s."""

    def __init__(self, gen: IoBindingGenerator, cross: np.ndarray, layout: DecoderLayout, repeat: int):
        self.gen, self.dtype = gen, cross.dtype
        if repeat > 1:
            cross = np.repeat(cross, repeat, axis=2)
        self.cross_names = [f"cross_{kv}_{i}" for i in range(cross.shape[0]) for kv in ("k", "v")]
        self.cross = [gen._upload(cross[i, j]) for i in range(cross.shape[0]) for j in range(2)]
        self.layout = layout.for_inputs(gen.decoder.input_names)
        empty = self.layout.empty_past(cross.shape[2], cross.dtype)
        self.past_names = list(empty)
        self.past = [gen._upload(p) for p in empty.values()]

    def step(self, ids: np.ndarray) -> np.ndarray:
        logits, self.past = self.gen._step(ids, self.past, self.past_names, self.cross, self.cross_names)
        return logits

    def select(self, rows: np.ndarray, cross: bool) -> None:
        rank = 6 if self.layout.stacked_cache else 4
        self.past = self.gen._gather(self.past, rows, axis=self.layout.batch_axis, dtype=self.dtype, rank=rank)
        if cross:
            self.cross = self.gen._gather(self.cross, rows, axis=0, dtype=self.dtype, rank=4)
