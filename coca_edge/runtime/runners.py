"""Runners: ``run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]``.

Generation is written once against this protocol. The ONNX Runtime runner lives here
(torch-free); another backend (TensorRT, a PyTorch reference) plugs in by implementing the
same ``run``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .bundle import ORT_FOR_CONTRIB_OP, BundleError, _version_tuple

__all__ = ["Runner", "OrtRunner", "MemoryConfig", "MEMORY_PRESETS", "default_providers", "PROVIDER_ORDER",
           "onnxruntime_version"]

# Preferred order when the caller does not choose.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(bfloat16)": "bfloat16"}


@dataclass(frozen=True)
class MemoryConfig:
    """How a bundle's ONNX Runtime sessions use memory; ``EdgeCoCa.load(memory=...)``.

    What each setting costs was measured with ``benchmarks/edge_footprint.py`` (docs/edge.md).
    """

    arena: bool = True          # SessionOptions.enable_cpu_mem_arena: activations from a growing arena
    mem_pattern: bool = True    # SessionOptions.enable_mem_pattern: one planned block per input shape
    prepacking: bool = True     # MatMul/Gemm weights re-laid-out once (a private copy per session)
    share_weights: bool = False  # weights equal across graphs held once, handed to ORT (add_initializer)
    # Not offered: ORT's global thread pool (set_global_thread_pool_sizes). Once it exists, every
    # later session in the process must opt into it or fail to load, which breaks any other ORT
    # user in the same process; per-session pools cost little memory (idle thread stacks).

    def __post_init__(self) -> None:
        for name in ("arena", "mem_pattern", "prepacking", "share_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MemoryConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.share_weights and self.prepacking:
            # Measured: each session then pre-packs its own copy of every shared weight and the
            # shared pages stay mapped too, which costs more memory than not sharing.
            raise ValueError("MemoryConfig(share_weights=True) needs prepacking=False")


# Measured on coca_ViT-S-32 (docs/edge.md): "lean" saved 7% peak RSS at batch 8 with no measurable
# speed cost; "low" saves 12% for a 1.3-1.4x slower caption (MatMuls without pre-packed weights).
MEMORY_PRESETS = {
    "default": MemoryConfig(),
    "lean": MemoryConfig(arena=False, mem_pattern=False),
    "low": MemoryConfig(arena=False, mem_pattern=False, prepacking=False, share_weights=True),
}


def onnxruntime_version() -> str:
    import onnxruntime as ort

    return ort.__version__


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
                 expected_io: tuple[list[dict], list[dict]] | None = None, name: str | None = None,
                 memory: MemoryConfig = MemoryConfig(), initializers: Sequence[tuple[str, np.ndarray]] = (),
                 requirement: str | None = None, optimized_cache: str | os.PathLike | None = None,
                 identity: str = ""):
        """``initializers``: (name, array) pairs the session uses instead of its own copy; the
        arrays must stay alive as long as the session (this runner keeps them). ``requirement``
        is what the bundle says this graph needs (named in the error when ORT cannot load it).
        ``optimized_cache``: a folder of ORT-optimised graphs (``runtime.optimized``): the session
        opens from this graph's entry without optimising again, or writes the entry; ``identity``
        (the manifest's digests of the graph's files) is part of its key. Not used with shared
        ``initializers`` (optimisation renames and folds them)."""
        import onnxruntime as ort

        self.path = Path(path)
        self.name = name or self.path.stem
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = memory.arena
        options.enable_mem_pattern = memory.mem_pattern
        if not memory.prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        self._initializers = [(n, ort.OrtValue.ortvalue_from_numpy(a)) for n, a in initializers]
        for n, value in self._initializers:
            options.add_initializer(n, value)
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
        # a provider is a name or ORT's (name, options) pair (e.g. runtime.trt.tensorrt_providers)
        missing = [p for p in (q[0] if isinstance(q, tuple) else q for q in providers) if p not in available]
        if missing:
            raise BundleError(f"execution provider(s) {missing} are not available in this onnxruntime build; "
                              f"available: {available}")
        self.session = None
        self.opened_from = self.path  # the bundle's graph, or its optimised copy from the cache
        cache = None
        if optimized_cache is not None and not initializers and optimization != "none":
            from .optimized import OptimizedGraphCache

            cache = OptimizedGraphCache(optimized_cache, self.path, identity, providers, optimization)
            hit = cache.lookup()
            if hit is not None:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    self.session = ort.InferenceSession(str(hit), options, providers=providers)
                    self.opened_from = hit
                    cache = None
                except Exception:  # a damaged entry: rebuild it from the bundle's graph
                    cache.discard()
                    options.graph_optimization_level = levels[optimization]
        if self.session is None:
            target = cache.staging_model() if cache is not None else None
            if target is not None:
                options.optimized_model_filepath = str(target)
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 target.name + ".data")
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
            try:
                self.session = ort.InferenceSession(str(self.path), options, providers=providers)
            except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
                if cache is not None:
                    cache.discard()
                raise BundleError(_load_failure(self.path, str(err), ort.__version__, requirement)) from None
            if target is not None:
                cache.commit()
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


def _load_failure(path: Path, message: str, installed: str, requirement: str | None) -> str:
    """Why ORT refused a graph, naming the ORT version it needs when that is the reason."""
    first = message.splitlines()[0] if message else "unknown error"
    opset = re.search(r"Opset (\d+) is under development.*?support for domain ([\w.]+) is till opset (\d+)", message,
                      re.S)
    if opset:
        return (f"{path}: this graph uses {opset.group(2)} opset {opset.group(1)}, but onnxruntime {installed} "
                f"runs up to opset {opset.group(3)}; it needs {requirement or 'a newer onnxruntime'} "
                "(pip install -U onnxruntime, or onnxruntime-gpu)")
    op = re.search(r"(?:([\w.]+):)?(\w+)\(-?\d+\) is not a registered function/op|No Op registered for (\w+)", message)
    if op:
        name = op.group(2) or op.group(3)
        needed = ORT_FOR_CONTRIB_OP.get(name)
        if needed and _version_tuple(installed) < _version_tuple(needed):
            why = f"onnxruntime >= {needed}"
        else:
            why = requirement or "an onnxruntime that implements it"
        return (f"{path}: onnxruntime {installed} has no kernel for operator {name!r} used by this graph; it "
                f"needs {why} (pip install -U onnxruntime, or onnxruntime-gpu)")
    return f"{path}: ONNX Runtime {installed} cannot load this graph ({first})"
