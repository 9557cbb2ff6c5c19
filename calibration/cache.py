"""On-disk cache of calibration results (tensor ranges per graph).

A static INT8 run spends most of its time calibrating (for the decoder: greedy generation
plus one augmented-model pass per recorded step). The ranges depend only on the graph, the
samples, the calibration method and the tensors collected, so they are stored as ONNX
Runtime's own range files (``onnxruntime.quantization.calibrate.save_tensors_data``, which
``quantize_static(calibration_cache_path=...)`` reads back) under a key of all four.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["default_cache_dir", "range_cache_key", "range_cache_path", "store_ranges"]


def default_cache_dir() -> Path:
    """``$COCA_EDGE_CACHE/calibration``, else ``~/.cache/coca-edge/calibration``."""
    root = os.environ.get("COCA_EDGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "coca-edge") / "calibration"


def range_cache_key(graph: str, model_sha256: str, data_key: dict[str, Any], method: dict[str, Any]) -> str:
    blob = json.dumps({"graph": graph, "model": model_sha256, "data": data_key, "method": method}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def range_cache_path(cache_dir: str | os.PathLike | None, graph: str, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"{graph}-{key}.json"


def store_ranges(written: Path, final: Path) -> None:
    """Move a range file ORT just wrote into the cache atomically (readers never see half a file)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tmp.write_bytes(written.read_bytes())
    os.replace(tmp, final)
