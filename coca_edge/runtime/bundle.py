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

__all__ = ["BundleError", "Bundle", "write_manifest", "sha256_file", "graph_sha256", "externalize_weights", "graph_requirements", "required_onnxruntime",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = "coca-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight-only", "int8-weight-only", "mixed")


# The first ONNX Runtime release that implements each ai.onnx opset (ORT's compatibility
# matrix, onnxruntime.ai/docs/reference/compatibility.html). Opsets past the table are named as
# "newer than" its last entry.
ORT_FOR_OPSET = {13: "1.6", 14: "1.8", 15: "1.9", 16: "1.12", 17: "1.13", 18: "1.14", 19: "1.15", 20: "1.17",
                 21: "1.18", 22: "1.21", 23: "1.23"}
# The first ORT release with a CPU kernel for the com.microsoft contrib ops coca-edge's exporter
# and quantizer emit (ORT's docs/ContribOperators.md history and release notes).
ORT_FOR_CONTRIB_OP = {"MatMulNBits": "1.17", "GatherBlockQuantized": "1.20", "DynamicQuantizeMatMul": "1.6",
                      "MatMulIntegerToFloat": "1.6", "QGemm": "1.11", "FusedMatMul": "1.4", "Gelu": "1.3",
                      "FastGelu": "1.3", "QuickGelu": "1.11", "SkipLayerNormalization": "1.3",
                      "MultiHeadAttention": "1.20", "GroupQueryAttention": "1.17"}
# MultiHeadAttention: the op is in 1.13, but the fused decoder (quantize/fusion.py) sets
# ``unidirectional`` with a past cache; ORT's CUDA kernel honours that only since microsoft/
# onnxruntime#21852 (merged 2024-08, released in 1.20). Run here with 1.32 only.


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or of an unknown format."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if not piece.isdigit() else piece
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def graph_requirements(path: str | os.PathLike) -> dict[str, Any]:
    """``opset_imports`` ({domain: version}) and ``contrib_ops`` of an ONNX file, for the manifest.

    Read at write time (onnx is imported here only, never on a device) without the external data.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: set[tuple[str, str]] = set()

    def visit(graph) -> None:
        for node in graph.node:
            ops.add((node.domain, node.op_type))
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    for function in model.functions:
        for node in function.node:
            ops.add((node.domain, node.op_type))
    local = {(f.domain, f.name) for f in model.functions}
    return {"opset_imports": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
            "contrib_ops": sorted(op for domain, op in ops if domain == "com.microsoft" and (domain, op) not in local)}


def required_onnxruntime(graph: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The lowest ORT version a graph's manifest entry needs, and why (one reason per requirement).

    None when the needed version is unknown (an opset newer than ``ORT_FOR_OPSET`` knows).
    """
    opset = (graph.get("opset_imports") or {}).get("ai.onnx", graph.get("opset"))
    needs: list[tuple[tuple[int, ...], str, str]] = []
    unknown = []
    if isinstance(opset, int):
        if opset in ORT_FOR_OPSET or opset < min(ORT_FOR_OPSET):
            version = ORT_FOR_OPSET.get(opset, "1.0")
            needs.append((_version_tuple(version), version, f"ONNX opset {opset}"))
        else:
            unknown.append(f"ONNX opset {opset} (newer than onnxruntime {ORT_FOR_OPSET[max(ORT_FOR_OPSET)]} "
                           f"implements)")
    for op in graph.get("contrib_ops", []):
        if op in ORT_FOR_CONTRIB_OP:
            needs.append((_version_tuple(ORT_FOR_CONTRIB_OP[op]), ORT_FOR_CONTRIB_OP[op], f"contrib op {op}"))
    if unknown:
        return None, unknown + [why for _, _, why in needs]
    if not needs:
        return None, []
    top = max(v for v, _, _ in needs)
    return next(s for v, s, _ in needs if v == top), [why for v, _, why in needs if v == top]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def graph_sha256(path: str | os.PathLike) -> str:
    """Identity of a graph: its ``.onnx`` file and, when present, its ``<file>.data`` weights
    (with external data the ``.onnx`` holds only the structure, so equal files can differ in weights)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if not data.is_file():
        return sha256_file(path)
    return hashlib.sha256((sha256_file(path) + sha256_file(data)).encode()).hexdigest()


def externalize_weights(path: str | os.PathLike, model: Any = None) -> list[str]:
    """Re-save the graph at ``path`` with its weights in ``<file>.data`` beside it (ONNX external
    data) and return the data file names. ONNX Runtime maps such weights from disk instead of
    parsing them into memory with the protobuf: measured on coca_ViT-B-32, -21% peak RSS (FP32,
    batch 1) and -43% cold start (docs/edge.md). Writers only: the runtime never calls this
    (it needs the ``onnx`` package). ``model``: the ``ModelProto`` to write at ``path`` (default: the
    graph already there)."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if model is None:
        model = onnx.load(str(path), load_external_data=True)
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [data.name] if data.exists() else []


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
        # What a device's ORT must implement, so that an old one is told the version it needs.
        graph.update(graph_requirements(directory / graph["file"]))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "coca_edge_version": version,
        "source_model": source_model,
        "graphs": graphs,
        "files": files,
        **(extra or {}),
        # After ``extra``: a manifest copied from a source bundle must not carry the source's ORT.
        "validated_with": {"onnxruntime": _installed_onnxruntime()},
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
    def load(cls, root: str | os.PathLike, verify_hashes: bool = True, hash_cache: bool = True) -> "Bundle":
        """Check format, files, sizes and sha256 of a bundle directory.

        ``hash_cache``: a file whose path, size, inode, mtime and ctime are unchanged since this
        machine last hashed it is not hashed again (the verified sha256 is kept in
        ``$XDG_CACHE_HOME/coca-edge/verified-sha256.json``; any write to a file changes its ctime,
        which no user can set back). Hashing the rest runs in parallel.
        """
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
        if isinstance(version, int) and version > FORMAT_VERSION:
            from .. import __version__

            raise BundleError(
                f"{manifest_path}: unknown bundle format_version {version}, newer than this coca-edge {__version__} "
                f"reads ({FORMAT_VERSION}); the bundle was written by coca-edge "
                f"{manifest.get('coca_edge_version', '?')} and needs a coca-edge that reads format version {version}: "
                "upgrade coca-edge (pip install -U coca-edge) or re-export the bundle with this version")
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
        if verify_hashes:
            digests = _hash_files([root / rel for rel in files], hash_cache)
            for rel, meta in files.items():
                if digests[root / rel] != meta.get("sha256"):
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

    def graph_files(self, name: str) -> list[str]:
        """The graph's ``.onnx`` and its external data files, relative to the bundle root."""
        g = self.manifest["graphs"][name]
        return [g["file"], *g.get("data_files", [])]

    def graph_bytes(self, name: str) -> int:
        files = self.manifest["files"]
        return sum(files[f]["bytes"] for f in self.graph_files(name))

    def graph_digest(self, name: str) -> str:
        """The graph's identity from the manifest: its ``.onnx`` sha256, combined with its weights'
        when they are in external data (the ``.onnx`` alone then holds only the structure)."""
        files = self.manifest["files"]
        names = self.graph_files(name)
        if len(names) == 1:
            return files[names[0]]["sha256"]
        return hashlib.sha256("".join(files[f]["sha256"] for f in names).encode()).hexdigest()

    def graph_io(self, name: str) -> tuple[list[dict], list[dict]]:
        g = self.manifest["graphs"][name]
        return g["inputs"], g["outputs"]

    def precision(self, name: str) -> str:
        return self.manifest["graphs"][name]["precision"]

    @property
    def fused_cross_kv(self) -> bool:
        return bool(self.manifest.get("fused_cross_kv"))


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/coca-edge`` (``~/.cache/coca-edge``): where the runtime's caches live."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coca-edge"


def _cache_path() -> Path:
    return cache_root() / "verified-sha256.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_ino}|{st.st_dev}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _hash_files(paths: list[Path], use_cache: bool) -> dict[Path, str]:
    """sha256 of each file: from the verified-hash cache where the file is unchanged, else hashed
    (in parallel threads: hashlib releases the GIL on large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    cache: dict[str, str] = {}
    if use_cache:
        try:
            cache = json.loads(_cache_path().read_text())
        except (OSError, ValueError):
            cache = {}
    keys = {p: _stat_key(p) for p in paths}
    out = {p: cache[k] for p, k in keys.items() if k in cache}
    todo = sorted((p for p in paths if p not in out), key=lambda p: -p.stat().st_size)
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        out.update(zip(todo, pool.map(sha256_file, todo)))
    if use_cache and todo:
        _remember({keys[p]: out[p] for p in todo}, cache)
    return out


def _remember(new: dict[str, str], cache: dict[str, str]) -> None:
    """Add verified hashes to the cache file; a read-only home (a locked-down device) just means no cache.

    The loader compares these with the manifest, so a cached digest of a modified file is still
    a mismatch: the cache only ever saves hashing, it never vouches for content by itself.
    """
    path = _cache_path()
    live = {k: v for k, v in cache.items() if os.path.exists(k.split("|", 1)[0])}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**live, **new}))
        os.replace(tmp, path)
    except OSError:
        pass


def _installed_onnxruntime() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object")
    return data
