"""Export a model into a deployable bundle directory (see coca_edge.runtime.bundle for the format)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from coca_edge import __version__
from coca_edge.models import CoCa
from coca_edge.runtime.bundle import CONFIG, write_manifest
from coca_edge.tokenizer import Tokenizer

from .onnx import DEFAULT_OPSET, export_onnx
from .specs import GRAPH_NAMES

__all__ = ["export_bundle", "bundle_config"]


def bundle_config(model: CoCa) -> dict[str, Any]:
    """``config.json`` of a bundle: model architecture, preprocessing and the logit scale."""
    cfg = model.config
    return {
        "model": cfg.to_dict(),
        "preprocess": {"image_size": cfg.vision.image_size, "mean": list(cfg.image_mean),
                       "std": list(cfg.image_std), "interpolation": "bicubic", "resize_mode": "shortest",
                       "fill_color": 0},
        "logit_scale": float(model.logit_scale.detach().exp()),
    }


def export_bundle(model: CoCa, out_dir: str | os.PathLike, source_model: dict[str, Any] | None = None,
                  graphs: Sequence[str] = GRAPH_NAMES, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                  fuse_cross_kv: bool = False, validate: bool = True, overwrite: bool = False,
                  progress: bool = True, cache_layout: str = "per-layer") -> Path:
    """Export graphs, config, tokenizer and manifest; the bundle appears only when complete.

    ``cache_layout="stacked"`` writes the decoder with the stacked cache I/O of bundles made
    before per-layer caches (for comparisons and compatibility tests; slower)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")
    if fuse_cross_kv and "cross_kv" in graphs:
        graphs = [g for g in graphs if g != "cross_kv"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        results = export_onnx(model, staging, graphs=graphs, opset=opset, exporter=exporter,
                              fuse_cross_kv=fuse_cross_kv, validate=validate, progress=progress,
                              cache_layout=cache_layout)
        (staging / CONFIG).write_text(json.dumps(bundle_config(model), indent=2))
        Tokenizer(context_length=model.config.context_length).save(staging)
        manifest_graphs = {}
        for name, result in results.items():
            spec = result["spec"]
            files = [f.name for f in result["files"]]
            manifest_graphs[name] = {
                "file": files[0], "data_files": files[1:], "precision": "fp32",
                "inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs],
                "opset": opset, "exporter": exporter,
                "validation": {"max_abs": max((r["max_abs"] for r in result["validation"]), default=None),
                               "cases": sorted({r["case"] for r in result["validation"]})},
            }
        write_manifest(staging, manifest_graphs, source_model or {"name": model.config.name}, __version__,
                       extra={"fused_cross_kv": fuse_cross_kv})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
