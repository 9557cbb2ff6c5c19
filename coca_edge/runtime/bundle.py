"""The deployable bundle: graphs + config.json + tokenizer files + manifest.json.

Torch-free. ``write_manifest`` is called by the exporter; ``Bundle.load`` verifies a
bundle before anything runs and says exactly what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BundleError", "Bundle", "write_manifest", "sha256_file", "FORMAT", "FORMAT_VERSION"]

FORMAT = "coca-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "mixed")


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or of an unknown format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike, graphs: dict[str, dict[str, Any]],
                   source_model: dict[str, Any], version: str, extra: dict[str, Any] | None = None) -> Path:
    """Hash every file of the bundle and write ``manifest.json``.

    ``graphs[name]`` holds ``file``, ``precision``, ``inputs`` and ``outputs`` (IO signatures:
    name, dtype, shape with symbolic axes as strings) and optionally ``data_files``.
    """
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.startswith("."):
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    for name, graph in graphs.items():
        if graph.get("precision") not in PRECISIONS:
            raise BundleError(f"graph {name}: precision must be one of {PRECISIONS}, got {graph.get('precision')!r}")
        for f in [graph["file"], *graph.get("data_files", [])]:
            if f not in files:
                raise BundleError(f"graph {name}: file {f} is not in {directory}")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "coca_edge_version": version,
        "source_model": source_model,
        "graphs": graphs,
        "files": files,
        **(extra or {}),
    }
    path = directory / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, path)
    return path


@dataclass
class Bundle:
    """A verified bundle directory."""

    root: Path
    manifest: dict[str, Any]
    config: dict[str, Any]

    @classmethod
    def load(cls, root: str | os.PathLike, verify_hashes: bool = True) -> "Bundle":
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"bundle not found: {root} is not a directory")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root}: missing {MANIFEST} (is this a coca-edge bundle? "
                              "create one with `coca-edge export`)")
        manifest = _read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{manifest_path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{manifest_path}: unknown bundle format_version {version!r}; this coca-edge reads "
                              f"version {FORMAT_VERSION} (re-export the bundle or upgrade coca-edge)")
        files = manifest.get("files")
        graphs = manifest.get("graphs")
        if not isinstance(files, dict) or not isinstance(graphs, dict):
            raise BundleError(f"{manifest_path}: 'files' and 'graphs' must be objects")
        for rel, meta in files.items():
            path = root / rel
            if not path.is_file():
                raise BundleError(f"{root}: missing file {rel} (listed in {MANIFEST})")
            if path.stat().st_size != meta.get("bytes"):
                raise BundleError(f"{root}: {rel} has {path.stat().st_size} bytes, manifest says {meta.get('bytes')} "
                                  "(truncated or replaced file)")
            if verify_hashes and sha256_file(path) != meta.get("sha256"):
                raise BundleError(f"{root}: sha256 mismatch for {rel} (corrupted or modified file)")
        for name, graph in graphs.items():
            if name not in GRAPHS:
                raise BundleError(f"{manifest_path}: unknown graph {name!r}")
            if graph.get("file") not in files:
                raise BundleError(f"{manifest_path}: graph {name} file {graph.get('file')!r} is not listed in files")
        for required in ("image_encoder", "text_encoder", "decoder"):
            if required not in graphs:
                raise BundleError(f"{manifest_path}: graph {required!r} is missing")
        if "cross_kv" not in graphs and not manifest.get("fused_cross_kv"):
            raise BundleError(f"{manifest_path}: no cross_kv graph and image_encoder does not output cross_kv")
        if CONFIG not in files:
            raise BundleError(f"{root}: {CONFIG} is not listed in {MANIFEST}")
        config = _read_json(root / CONFIG)
        for key in ("model", "preprocess", "logit_scale"):
            if key not in config:
                raise BundleError(f"{root / CONFIG}: missing key {key!r}")
        return cls(root, manifest, config)

    def graph_path(self, name: str) -> Path:
        return self.root / self.manifest["graphs"][name]["file"]

    def graph_io(self, name: str) -> tuple[list[dict], list[dict]]:
        g = self.manifest["graphs"][name]
        return g["inputs"], g["outputs"]

    def precision(self, name: str) -> str:
        return self.manifest["graphs"][name]["precision"]

    @property
    def fused_cross_kv(self) -> bool:
        return bool(self.manifest.get("fused_cross_kv"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data
