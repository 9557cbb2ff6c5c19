"""Models under test: a bundle (ONNX Runtime) or a checkpoint (PyTorch), behind the same runners.

Every model becomes an ``EdgeCoCa`` whose runners serve the four graphs' IO, so one numpy
generation loop (``coca_edge.runtime.generation``) drives bundles and checkpoints alike.
This module imports torch (for checkpoints), which is why it lives outside the runtime.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..runtime import Bundle, EdgeCoCa
from ..runtime.bundle import MANIFEST

__all__ = ["ModelUnderTest", "TorchRunner", "open_model", "check_compatible", "torch_device", "describe_device",
           "ModelSpecError", "IncompatibleModelsError", "DTYPE_SUFFIXES"]

# fp16: FP16 arithmetic with what an FP16 bundle keeps in FP32 (LayerNorm, the vocabulary head);
# fp16-pure: every op in FP16.
DTYPE_SUFFIXES = ("fp32", "fp16", "fp16-pure", "bf16")
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "fp16-pure": "float16", "bf16": "bfloat16"}
# Architecture keys that must agree between reference and candidate (names and descriptions may differ).
_ARCH_KEYS = ("vision", "text", "decoder", "embed_dim", "quick_gelu", "sot_token_id", "eot_token_id",
              "pad_token_id")
_TOKENIZER_KEYS = ("vocab_sha256", "vocab_size", "sot_token_id", "eot_token_id", "pad_token_id", "context_length")


class ModelSpecError(ValueError):
    """A model spec (path, suffix) names nothing that can be validated."""


class IncompatibleModelsError(ValueError):
    """Reference and candidate differ in architecture or tokenizer, so their outputs cannot be compared."""


class TorchRunner:
    """One graph's IO served by a PyTorch module (the model's own computation, not the exported one).

    Inputs arrive as numpy float32/int64; float inputs are cast to ``dtype`` and outputs come
    back as float32 numpy, so generation feeds them back like ONNX Runtime outputs.
    """

    def __init__(self, module: Any, input_names: Sequence[str], output_names: Sequence[str], name: str,
                 dtype: str = "fp32", device: str = "cpu"):
        import torch

        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.name = name
        self.device = torch.device(device)
        self.dtype = getattr(torch, _TORCH_DTYPES[dtype])

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"graph {self.name}: missing input(s) {missing}")
        args = []
        for n in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.inference_mode(), _fp32_means_fp32(self.device):
            result = self.module(*args)
        result = result if isinstance(result, (tuple, list)) else (result,)
        values = {n: r.float().cpu().numpy() for n, r in zip(self.output_names, result)}
        return {n: values[n] for n in (outputs or self.output_names)}


@contextlib.contextmanager
def _fp32_means_fp32(device: Any) -> Iterator[None]:
    """On CUDA, FP32 ops run in full FP32 (no TF32), then the process's settings come back.

    cuDNN convolutions default to TF32 on Ampere and later (10 mantissa bits), which would make a
    CUDA "FP32" reference drift from the CPU's and blur the FP32 parts of ``@fp16`` (LayerNorm,
    the vocabulary head). FP16 / BF16 ops are untouched: they run as the GPU runs them.
    """
    if device.type != "cuda":
        yield
        return
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_device(device: str) -> Any:
    """``device`` as a ``torch.device`` that exists here, or a ``ModelSpecError`` saying why not."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelSpecError(f"device {device!r}: not a torch device ({str(err).splitlines()[0]}); "
                             "expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelSpecError(f"device {device!r}: torch {torch.__version__} sees no CUDA device (this build's "
                                 f"CUDA: {torch.version.cuda or 'none, a CPU-only build'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelSpecError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ModelSpecError(f"device {device!r}: checkpoints run on cpu or cuda, not {dev.type}")
    return dev


def describe_device(device: str) -> str:
    """What a report says about the torch device checkpoints ran on."""
    import torch

    dev = torch_device(device)
    if dev.type != "cuda":
        return f"{dev} (torch {torch.__version__})"
    return (f"{dev} ({torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
            "FP32 ops without TF32)")


@dataclass
class ModelUnderTest:
    """A loaded model: its runners (inside ``edge``), what it is, and what it costs on disk."""

    spec: str
    kind: str  # "onnx" or "torch"
    edge: EdgeCoCa
    precision: str
    bytes: int | None = None
    params: int | None = None
    graph_files: dict[str, Path] = field(default_factory=dict)  # ONNX files (bundles only)
    manifest: dict[str, Any] = field(default_factory=dict)
    device: str | None = None  # where a checkpoint runs (torch device); None for bundles

    @property
    def name(self) -> str:
        return self.spec

    @property
    def runners(self) -> dict:
        return self.edge.runners

    @property
    def model_config(self) -> dict:
        return self.edge.model_config

    @property
    def tokenizer(self):
        return self.edge.tokenizer

    @property
    def fused_cross_kv(self) -> bool:
        return self.edge.bundle.fused_cross_kv

    def info(self) -> dict[str, Any]:
        info = {"spec": self.spec, "kind": self.kind, "precision": self.precision, "bytes": self.bytes,
                "params": self.params, "model": self.model_config.get("name")}
        if self.device is not None:
            info["device"] = self.device
        return info


def _split_spec(spec: str) -> tuple[str, str | None]:
    head, sep, tail = str(spec).rpartition("@")
    if sep and tail in DTYPE_SUFFIXES:
        return head, tail
    return str(spec), None


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def open_model(spec: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None,
               device: str = "cpu") -> ModelUnderTest:
    """A bundle directory (ONNX Runtime) or a checkpoint (PyTorch; ``PATH@fp16`` / ``@fp16-pure`` /
    ``@bf16`` runs it in that dtype - real reduced-precision math, unlike ONNX Runtime's CPU FP16
    emulation; ``@fp16`` keeps LayerNorm and the vocabulary head in FP32 as FP16 bundles do).

    ``device`` (``cpu``, ``cuda``, ``cuda:N``) is where a checkpoint runs; a bundle runs on
    ``providers``. On CUDA, FP32 means FP32: TF32 is off while a checkpoint's graphs run."""
    if isinstance(spec, ModelUnderTest):
        return spec
    path_str, dtype = _split_spec(str(spec))
    path = Path(path_str)
    if not path.exists():
        raise ModelSpecError(f"{path}: no such bundle directory or checkpoint")
    if path.is_dir() and (path / MANIFEST).is_file():
        if dtype is not None:
            raise ModelSpecError(f"{spec}: a dtype suffix applies to PyTorch checkpoints only; a bundle runs in "
                                 "the precision it was exported/quantized to")
        return _open_bundle(str(spec), path, providers, threads)
    return _open_checkpoint(str(spec), path, dtype or "fp32", str(torch_device(device)))


def _open_bundle(spec: str, path: Path, providers: Sequence[str] | None, threads: int | None) -> ModelUnderTest:
    edge = EdgeCoCa.load(path, providers=providers, threads=threads)
    bundle = edge.bundle
    graphs = bundle.manifest["graphs"]
    precisions = sorted({g["precision"] for g in graphs.values()})
    size = sum(bundle.graph_bytes(name) for name in graphs)
    return ModelUnderTest(spec, "onnx", edge, precisions[0] if len(precisions) == 1 else "mixed", size, None,
                          {name: bundle.graph_path(name) for name in graphs}, bundle.manifest)


def _open_checkpoint(spec: str, path: Path, dtype: str, device: str) -> ModelUnderTest:
    import torch

    from ..exporters.bundle import bundle_config
    from ..exporters.specs import graph_specs
    from ..models.openclip import load_checkpoint
    from ..tokenizer import Tokenizer

    if path.is_dir() and not (path / "open_clip_config.json").is_file() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"  # a coca-edge model directory (weights + config.json)
    try:
        model = load_checkpoint(path)
    except (OSError, RuntimeError) as err:
        raise ModelSpecError(f"{path}: cannot read as a checkpoint ({str(err).splitlines()[0]})") from None
    config = bundle_config(model)  # before any dtype change: the logit scale is read in FP32
    model = model.to(device=device, dtype=getattr(torch, _TORCH_DTYPES[dtype])).eval()
    if dtype == "fp16":
        from ..models.coca import half_with_fp32_blocks

        model = half_with_fp32_blocks(model)
    specs = graph_specs(model.config)
    runners = {name: TorchRunner(s.reference_module(model).eval(), s.input_names, s.output_names, name, dtype,
                                 device) for name, s in specs.items()}
    pseudo = Bundle(path, {"graphs": {name: {"precision": dtype} for name in specs}, "fused_cross_kv": False}, config)
    edge = EdgeCoCa(pseudo, runners, Tokenizer(context_length=model.config.context_length))
    params = sum(p.numel() for p in model.parameters())
    return ModelUnderTest(spec, "torch", edge, dtype, _dir_bytes(path), params, device=device)


def _arch(config: dict) -> dict:
    return {k: config.get(k) for k in _ARCH_KEYS}


def same_architecture(reference: ModelUnderTest, candidate: ModelUnderTest) -> bool:
    ref, cand = _arch(reference.model_config), _arch(candidate.model_config)
    return all(ref[k] == cand[k] for k in _ARCH_KEYS)


def check_compatible(reference: ModelUnderTest, candidate: ModelUnderTest,
                     different_architecture: bool = False) -> None:
    """Raise ``IncompatibleModelsError`` unless both have the same tokenizer and (unless
    ``different_architecture``: a student against its teacher, compared on tasks only) the
    same architecture."""
    ref, cand = _arch(reference.model_config), _arch(candidate.model_config)
    diff = [k for k in _ARCH_KEYS if ref[k] != cand[k]]
    if diff and not different_architecture:
        detail = "; ".join(f"{k}: reference {ref[k]!r}, candidate {cand[k]!r}" for k in diff[:3])
        raise IncompatibleModelsError(f"{candidate.spec}: architecture differs from the reference "
                                      f"{reference.spec} ({detail}); to compare a student with its teacher "
                                      "on the tasks only, pass --different-architecture")
    if diff and reference.edge.preprocess_config != candidate.edge.preprocess_config:
        raise IncompatibleModelsError(f"{candidate.spec}: image preprocessing differs from the reference "
                                      f"{reference.spec} ({candidate.edge.preprocess_config} vs "
                                      f"{reference.edge.preprocess_config}): both must read the same pixels")
    rt, ct = reference.tokenizer.to_dict(), candidate.tokenizer.to_dict()
    diff = [k for k in _TOKENIZER_KEYS if rt.get(k) != ct.get(k)]
    if diff:
        detail = "; ".join(f"{k}: reference {rt.get(k)!r}, candidate {ct.get(k)!r}" for k in diff)
        raise IncompatibleModelsError(f"{candidate.spec}: tokenizer differs from the reference "
                                      f"{reference.spec} ({detail})")

