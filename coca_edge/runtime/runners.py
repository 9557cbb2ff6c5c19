"""Runners: ``run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.

Generation is written once against this protocol. The ONNX Runtime runner lives here
(torch-free); another backend (TensorRT, a PyTorch reference) plugs in by implementing the
same ``run``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .bundle import BundleError

__all__ = ["Runner", "OrtRunner", "default_providers", "PROVIDER_ORDER"]

# Preferred order when the caller does not choose.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


@runtime_checkable
class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PROVIDER_ORDER if p in available] or ["CPUExecutionProvider"]


class OrtRunner:
    """One ONNX Runtime session for one graph."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None, optimization: str = "all",
                 expected_io: tuple[list[dict], list[dict]] | None = None, name: str | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.stem
        options = ort.SessionOptions()
        options.log_severity_level = 3
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        options.graph_optimization_level = levels[optimization]
        # Worker threads stop spinning when a run returns. A bundle runs several sessions in turn
        # (image encoder, cross K/V, then the decoder loop) and on a small CPU the previous
        # session's spinning workers take cores from the next one: captioning measured 5-12%
        # faster with this (docs/export.md, benchmarks/decode_levers.py --sections spinning).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers) if providers else default_providers()
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise BundleError(f"execution provider(s) {missing} are not available in this onnxruntime build; "
                              f"available: {available}")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"{self.path}: ONNX Runtime cannot load this graph ({str(err).splitlines()[0]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if expected_io is not None:
            self._check_io(*expected_io)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _check_io(self, inputs: list[dict], outputs: list[dict]) -> None:
        want_in = [(t["name"], t["dtype"], len(t["shape"])) for t in inputs]
        have_in = [(i.name, _ORT_DTYPES.get(i.type, i.type), len(i.shape)) for i in self.session.get_inputs()]
        want_out = [t["name"] for t in outputs]
        if want_in != have_in or want_out != self.output_names:
            raise BundleError(
                f"{self.path.name}: graph IO does not match the manifest: manifest inputs {want_in} outputs "
                f"{want_out}; graph inputs {have_in} outputs {self.output_names}")

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self.output_names
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"graph {self.name}: missing input(s) {missing}")
        values = self.session.run(names, {n: feed[n] for n in self.input_names})
        return dict(zip(names, values))
