"""ONNX export with built-in validation against PyTorch.

``export_onnx`` writes one ``.onnx`` file per graph with its weights in ``<graph>.onnx.data``, runs
``onnx.checker`` and shape inference, then runs every graph in ONNX Runtime on shapes that
differ from the export shapes and compares it with the PyTorch module it came from.

Exporter: ``dynamo`` (torch.export) by default. Both exporters produce a correct KV-cached
decode step here; the choice and the measurements behind it are in docs/export.md.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from coca_edge.models import CoCa
from coca_edge.runtime.generation import fit_cache_feed

from .specs import GRAPH_NAMES, GraphSpec, graph_specs, split_cross

__all__ = ["ExportError", "GraphMismatchError", "export_onnx", "validate_graph", "VALIDATION_CASES",
           "DEFAULT_OPSET", "compare_outputs"]

DEFAULT_OPSET = 20

# (batch, seq, past): export uses (2, 3, 2); validation deliberately uses other sizes,
# including a first decode step (past 0), a single-token step and a prefill.
VALIDATION_CASES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "image_encoder": ((1, 1, 0), (3, 1, 0)),
    "text_encoder": ((1, 5, 0), (3, 76, 0), (2, 9, 0)),
    "cross_kv": ((1, 1, 0), (3, 1, 0)),
    "decoder": ((1, 1, 0), (3, 1, 5), (1, 4, 0), (2, 1, 17)),
}


class ExportError(RuntimeError):
    """Export or its built-in validation failed."""


class GraphMismatchError(ExportError):
    """An exported graph's output differs from PyTorch by more than its tolerance."""

    def __init__(self, graph: str, output: str, max_error: float, tolerance: float, case: str):
        self.graph, self.output, self.max_error, self.tolerance, self.case = graph, output, max_error, tolerance, case
        super().__init__(f"graph '{graph}' output '{output}' ({case}): max-abs error {max_error:.3g} "
                         f"exceeds tolerance {tolerance:.3g}")


@dataclass(frozen=True)
class ComparisonStats:
    output: str
    max_abs: float
    mean_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def compare_outputs(graph: GraphSpec, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray],
                    case: str, scale: float = 1.0) -> list[ComparisonStats]:
    stats = []
    for name in graph.output_names:
        ref, out = reference[name], actual[name]
        if ref.shape != out.shape:
            raise ExportError(f"graph '{graph.name}' output '{name}' ({case}): shape {list(out.shape)}, "
                              f"PyTorch gives {list(ref.shape)}")
        diff = np.abs(ref.astype(np.float64) - out.astype(np.float64)) if ref.size else np.zeros(1)
        stats.append(ComparisonStats(name, float(diff.max()), float(diff.mean()), graph.tolerance[name] * scale))
    return stats


# The dynamo exporter logs four "torchvision is not installed. Skipping torchvision::nms"-style
# warnings per graph when torchvision is absent (the `cpu` extra does not install it); CoCa
# uses none of those ops.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


def _not_torchvision_skip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("torchvision is not installed")


@contextlib.contextmanager
def _export_patches():
    """The legacy exporter cannot trace nn.MultiheadAttention's fast path; quiet known warnings."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    registration = logging.getLogger(_REGISTRATION_LOGGER)
    registration.addFilter(_not_torchvision_skip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        registration.removeFilter(_not_torchvision_skip)
        torch.backends.mha.set_fastpath_enabled(previous)


def _export_one(module: torch.nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor], path: Path,
                opset: int, exporter: str) -> None:
    args = tuple(inputs[n] for n in spec.input_names)
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs + spec.outputs}
    if exporter == "dynamo":
        dims: dict[str, torch.export.Dim] = {}
        dynamic_shapes = []
        for t in spec.inputs:
            entry = {}
            for i, d in enumerate(t.shape):
                if isinstance(d, str):
                    entry[i] = dims.setdefault(d, torch.export.Dim(d, max=4096))
            dynamic_shapes.append(entry)
        # torch.export matches dynamic_shapes to the signature: a *args tail is one nested entry
        params = inspect.signature(module.forward).parameters.values()
        fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            dynamic_shapes = dynamic_shapes[:fixed] + [tuple(dynamic_shapes[fixed:])]
        onnx_program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=tuple(dynamic_shapes), verbose=False)
        onnx_program.save(str(path), external_data=True)
    elif exporter == "torchscript":
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=min(opset, 18),
                          input_names=spec.input_names, output_names=spec.output_names, dynamic_axes=axes)
    else:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")


def _finalize(tmp_path: Path, path: Path) -> list[Path]:
    """Re-save with the weights in ``<graph>.onnx.data`` (see ``externalize_weights``), check it
    and infer shapes."""
    import onnx

    from coca_edge.runtime.bundle import externalize_weights

    data_files = externalize_weights(path, onnx.load(str(tmp_path), load_external_data=True))
    files = [path] + [path.with_name(name) for name in data_files]
    try:
        onnx.checker.check_model(str(path), full_check=False)
        onnx.shape_inference.infer_shapes_path(str(path), str(path) + ".shapes", check_type=True)
        os.unlink(str(path) + ".shapes")
    except Exception as err:  # onnx raises several checker/inference error types
        raise ExportError(f"{path.name}: ONNX checker / shape inference failed: {err}") from err
    return files


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _text_ids(config, batch: int, length: int, seed: int) -> torch.Tensor:
    """Padded caption-like ids: start token, words, end token, zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(0, max(1, length - 1), (1,), generator=g)) if length > 2 else 0
        ids[b, 0] = config.sot_token_id
        ids[b, 1: 1 + n] = torch.randint(1, config.sot_token_id, (n,), generator=g)
        ids[b, min(1 + n, length - 1)] = config.eot_token_id
    return ids


def validation_inputs(model: CoCa, spec: GraphSpec, batch: int, seq: int, past: int,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    feed = spec.dummy_inputs(model.config, batch=batch, seq=seq, past=past, seed=seed)
    if spec.name == "text_encoder":
        feed["input_ids"] = _text_ids(model.config, batch, seq, seed)
    elif spec.name == "image_encoder":
        # realistic activations: normalised pixels in about [-2, 2]
        feed["pixel_values"] = feed["pixel_values"].clamp(-2.0, 2.0)
    elif spec.name == "decoder":
        # realistic cache values come from the model itself
        with torch.no_grad():
            size = model.config.vision.image_size
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
            _, tokens = model.encode_image(pixels)
            cache = model.empty_cache(tokens)
            if past:
                prefix = torch.randint(1, model.config.sot_token_id, (batch, past),
                                       generator=torch.Generator().manual_seed(seed + 1))
                _, cache = model.decode_step(prefix, cache)
        past = fit_cache_feed({"past_text": cache.text, "past_decoder": cache.decoder}, spec.input_names)
        feed = {"input_ids": feed["input_ids"], **past, **split_cross(cache.cross, model.config.decoder.layers)}
    elif spec.name == "cross_kv":
        with torch.no_grad():
            size = model.config.vision.image_size
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
            feed["image_tokens"] = model.encode_image(pixels)[1]
    return feed


def validate_graph(path: Path, spec: GraphSpec, model: CoCa,
                   cases: Iterable[tuple[int, int, int]] | None = None) -> list[dict]:
    """Run the graph in ORT on ``cases`` and compare with PyTorch; raise on the first mismatch."""
    session = _session(path)
    module = spec.reference_module(model).eval()
    report = []
    for batch, seq, past in cases or VALIDATION_CASES[spec.name]:
        case = f"batch={batch}, seq={seq}, past={past}"
        feed = validation_inputs(model, spec, batch, seq, past)
        with torch.no_grad():
            ref = module(*(feed[n] for n in spec.input_names))
        ref = ref if isinstance(ref, tuple) else (ref,)
        reference = {n: r.numpy() for n, r in zip(spec.output_names, ref)}
        actual = dict(zip(spec.output_names, session.run(spec.output_names,
                                                         {n: v.numpy() for n, v in feed.items()})))
        for stat in compare_outputs(spec, reference, actual, case):
            if not stat.ok:
                raise GraphMismatchError(spec.name, stat.output, stat.max_abs, stat.tolerance, case)
            report.append({"case": case, "output": stat.output, "max_abs": stat.max_abs,
                           "mean_abs": stat.mean_abs, "tolerance": stat.tolerance})
    return report


def export_onnx(model: CoCa, out_dir: str | os.PathLike, graphs: Sequence[str] = GRAPH_NAMES,
                opset: int = DEFAULT_OPSET, exporter: str = "dynamo", fuse_cross_kv: bool = False,
                validate: bool = True, progress: bool = True, cache_layout: str = "per-layer") -> dict[str, dict]:
    """Export ``graphs`` of ``model`` to ``out_dir/<graph>.onnx``; returns per graph its files and validation."""
    unknown = [g for g in graphs if g not in GRAPH_NAMES]
    if unknown:
        raise ValueError(f"unknown graph(s) {unknown}; graphs are {', '.join(GRAPH_NAMES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    specs = graph_specs(model.config, fuse_cross_kv=fuse_cross_kv, cache_layout=cache_layout)
    results: dict[str, dict] = {}
    from tqdm.auto import tqdm

    bar = tqdm(list(graphs), desc="export", unit="graph", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        spec = specs[name]
        inputs = validation_inputs(model, spec, batch=2, seq=3, past=2, seed=123)
        path = out_dir / f"{name}.onnx"
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
            tmp_path = Path(tmp) / f"{name}.onnx"
            with _export_patches(), torch.no_grad():
                try:
                    _export_one(spec.build(model).eval(), spec, inputs, tmp_path, opset, exporter)
                except ExportError:
                    raise
                except Exception as err:
                    raise ExportError(f"exporting graph '{name}' with the {exporter} exporter failed: "
                                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
            files = _finalize(tmp_path, path)
        report = validate_graph(path, spec, model) if validate else []
        results[name] = {"files": files, "spec": spec, "validation": report}
    return results
