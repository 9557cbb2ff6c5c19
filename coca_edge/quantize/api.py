"""``quantize(bundle_dir, config, out_dir, calib)``: an FP32 bundle in, a new quantized bundle out."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .config import AutoFallbackConfig, QuantizeError
from .methods import GraphJob, method_for

__all__ = ["quantize", "resolve_plan", "source_record"]

QUANTIZED_BY = "coca-edge quantize"


def resolve_plan(config: Any, graphs: list[str]) -> dict[str, Any]:
    """One config for every graph, or a ``{graph: config}`` plan covering every graph."""
    if isinstance(config, Mapping):
        unknown = set(config) - set(graphs)
        if unknown:
            raise QuantizeError(f"plan names graphs {sorted(unknown)} that the bundle does not have ({graphs})")
        missing = [g for g in graphs if g not in config]
        if missing:
            raise QuantizeError(f"plan has no config for graph(s) {missing}; use Fp32Config() to keep one as is")
        plan = {g: config[g] for g in graphs}
    else:
        plan = {g: config for g in graphs}
    for graph, cfg in plan.items():
        method_for(cfg)  # unknown config types fail before any work
    return plan


def source_record(bundle) -> dict[str, Any]:
    from coca_edge.runtime.bundle import MANIFEST, sha256_file

    return {"path": str(Path(bundle.root).resolve()), "manifest_sha256": sha256_file(Path(bundle.root) / MANIFEST)}


def _check_fp32(bundle) -> None:
    quantized = {g: m["precision"] for g, m in bundle.manifest["graphs"].items() if m.get("precision") != "fp32"}
    if quantized:
        source = bundle.manifest.get("quantization", {}).get("source_bundle", {}).get("path")
        hint = f"; quantize the FP32 bundle it came from ({source})" if source else ""
        raise QuantizeError(f"{bundle.root} is already quantized ({', '.join(f'{g}: {p}' for g, p in quantized.items())})"
                            f"{hint}")


def _check_out(bundle_root: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == bundle_root.resolve():
        raise QuantizeError(f"--out {out_dir} is the input bundle: quantize never edits a bundle in place")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise QuantizeError(f"{out_dir} exists and is not empty; choose another --out or pass overwrite")


def quantize(bundle_dir: str | os.PathLike, config: Any, out_dir: str | os.PathLike,
             calib: Any = None, *, calib_samples: int | None = None, overwrite: bool = False,
             progress: bool = True, cache_dir: str | os.PathLike | None = None,
             extra_manifest: dict[str, Any] | None = None) -> Path:
    """Quantize the FP32 bundle ``bundle_dir`` into a new bundle ``out_dir``.

    ``config``: a graph config (``Fp16Config``, ``Int8DynamicConfig``, ``Int8StaticConfig``,
    ``WeightOnlyConfig``, ``Fp32Config``) for every graph, a ``{graph: config}`` plan (see
    ``presets.preset_plan``), or an ``AutoFallbackConfig`` (quantize, then fall back nodes
    until gates pass). ``calib``: a ``CalibrationData``, a dataset spec such as
    ``"synthetic-scenes:train"``, or an image array; needed by static INT8 only. The bundle
    is written into a staging folder and renamed into place: an error or interrupt leaves
    nothing at ``out_dir``.
    """
    if isinstance(config, AutoFallbackConfig):
        from .fallback import quantize_with_fallback

        return quantize_with_fallback(bundle_dir, config, out_dir, calib, calib_samples=calib_samples,
                                      overwrite=overwrite, progress=progress, cache_dir=cache_dir)
    from coca_edge.runtime.bundle import Bundle

    bundle = Bundle.load(bundle_dir)
    _check_fp32(bundle)
    out_dir = Path(out_dir)
    _check_out(bundle.root, out_dir, overwrite)
    plan = resolve_plan(config, list(bundle.manifest["graphs"]))
    calibration = _calibration(bundle, plan, calib, calib_samples, progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        graphs = _write_graphs(bundle, plan, staging, calibration, cache_dir, progress)
        _finish(bundle, staging, graphs, plan, extra_manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _calibration(bundle, plan: dict[str, Any], calib: Any, samples: int | None, progress: bool):
    needs = [g for g, cfg in plan.items() if cfg.needs_calibration]
    if not needs:
        return None
    if calib is None or (isinstance(calib, str) and not calib):
        raise QuantizeError(f"static INT8 for {needs} needs calibration data: pass calib= (e.g. "
                            "'synthetic-scenes:train') or --calib")
    from coca_edge.calibration import CalibrationSet

    return CalibrationSet(bundle.root, calib, samples=samples, progress=progress)


def _write_graphs(bundle, plan, staging: Path, calibration, cache_dir, progress: bool) -> dict[str, dict]:
    from coca_edge.runtime.bundle import MANIFEST, externalize_weights

    from .methods import count_ops

    files = bundle.manifest["files"]
    graph_files = {f for g in bundle.manifest["graphs"] for f in bundle.graph_files(g)}
    for rel in files:
        if rel not in graph_files and rel != MANIFEST:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.root / rel, staging / rel)
    records: dict[str, dict] = {}
    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="quantize", unit="graph")
    for graph, cfg in items:
        if progress:
            items.set_postfix_str(f"{graph}: {cfg.precision}")
        meta = bundle.manifest["graphs"][graph]
        source = bundle.graph_path(graph)
        target = staging / f"{graph}.onnx"
        job = GraphJob(graph, source, target, cfg, bundle.graph_digest(graph), calibration,
                       Path(cache_dir) if cache_dir else None, list(meta.get("data_files", [])))
        try:
            info = method_for(cfg)(job)
            data_files = info.pop("data_files", None)
            if data_files is None:  # ORT's quantizers write one file; weights go to external data
                data_files = externalize_weights(target)
        except QuantizeError:
            raise
        except Exception as err:  # ORT's quantizers raise plain exceptions; name the graph and method
            raise QuantizeError(f"{graph}: {type(cfg).__name__} failed in ONNX Runtime's quantizer: "
                                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
        records[graph] = {
            **{k: v for k, v in meta.items() if k not in ("file", "data_files", "precision")},
            "file": target.name, "data_files": data_files, "precision": cfg.precision,
            "inputs": _io_dtypes(target, meta["inputs"], "input"),
            "outputs": _io_dtypes(target, meta["outputs"], "output"),
            "quantization": {"method": cfg.kind, "config": cfg.to_dict(),
                             "excluded_nodes": list(cfg.exclude_nodes), "ops": count_ops(target), **info},
        }
    return records


def _io_dtypes(path: Path, io: list[dict], kind: str) -> list[dict]:
    """The manifest IO with dtypes read back from the written graph (FP16 IO when not kept)."""
    import onnx

    names = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 16: "bfloat16"}
    graph = onnx.load(str(path), load_external_data=False).graph
    values = {v.name: v for v in (graph.input if kind == "input" else graph.output)}
    out = []
    for t in io:
        v = values.get(t["name"])
        dtype = names.get(v.type.tensor_type.elem_type, t["dtype"]) if v is not None else t["dtype"]
        out.append({**t, "dtype": dtype})
    return out


def _finish(bundle, staging: Path, graphs: dict[str, dict], plan: dict[str, Any],
            extra_manifest: dict[str, Any] | None) -> None:
    from coca_edge import __version__
    from coca_edge.runtime.bundle import write_manifest

    extra = {k: v for k, v in bundle.manifest.items()
             if k not in ("format", "format_version", "coca_edge_version", "source_model", "graphs", "files")}
    source = source_record(bundle)
    # Validation reads the top-level path to localise drift against the FP32 graphs.
    extra["source_bundle"] = source["path"]
    extra["quantization"] = {"tool": QUANTIZED_BY, "source_bundle": source,
                             "plan": {g: cfg.to_dict() for g, cfg in plan.items()}, **(extra_manifest or {})}
    write_manifest(staging, graphs, bundle.manifest["source_model"], __version__, extra=extra)
