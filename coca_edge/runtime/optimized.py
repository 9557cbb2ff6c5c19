"""A per-machine cache of ONNX Runtime's optimised graphs, so that a device opens sessions fast.

Opening a session spends most of its time in ORT's graph optimisation (fusions, constant
folding, layout transforms): measured on the coca_ViT-B-32 INT8 bundle, the four sessions take
1.27 s at ``ORT_ENABLE_ALL`` and 0.47 s when loading graphs ORT optimised and saved before
(``SessionOptions.optimized_model_filepath``) at ``ORT_DISABLE_ALL`` (docs/edge.md). The first
load of a bundle on a machine writes the optimised graphs (weights in external data) into
``$XDG_CACHE_HOME/coca-edge/optimized-graphs/<key>/``; later loads use them.

An optimised graph at ``ORT_ENABLE_ALL`` may hold hardware-specific transforms (ORT warns about
its NCHWc layout), so the key covers the ORT version, the execution providers, the optimisation
level, the CPU (architecture and feature flags) and the source graph (its manifest digest and the
size, mtime and inode of its files: a changed bundle never meets an old entry). An entry is
written into a staging folder and renamed into place with a record of its files' stat; an entry
whose files changed since is ignored and rebuilt, and any failure to write or to use the cache
falls back to ORT's own optimisation. Costs disk: one more copy of each graph's weights.

Stale entries are pruned when a new one is written: an entry whose source graph files are gone or
changed (a re-exported, re-quantized or deleted bundle) can never be used again, so it is
removed, as are staging folders a killed process left more than a day ago. Without that, every
re-export of a bundle would leave one more copy of its weights in the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

__all__ = ["default_cache_dir", "OptimizedGraphCache", "prune_stale"]

_RECORD = "entry.json"
_STAGING_MAX_AGE_S = 24 * 3600


def default_cache_dir() -> Path:
    from .bundle import cache_root

    return cache_root() / "optimized-graphs"


def _cpu() -> str:
    """Architecture and feature flags: what ORT's hardware-specific transforms depend on."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class OptimizedGraphCache:
    """The cache entry of one graph under one session configuration."""

    def __init__(self, root: str | os.PathLike, graph: str | os.PathLike, identity: str,
                 providers: Sequence[Any], level: str):
        import onnxruntime as ort

        self.root, self.graph = Path(root), Path(graph)
        sources = [self.graph] + [p for p in [self.graph.with_name(self.graph.name + ".data")] if p.is_file()]
        self.sources = {str(p.resolve()): _stat(p) for p in sources}
        key = {"ort": ort.__version__, "level": level, "cpu": _cpu(), "identity": identity,
               "providers": [p[0] if isinstance(p, tuple) else p for p in providers],
               "sources": self.sources}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.entry = self.root / f"{self.graph.stem}-{digest}"
        self.model = self.entry / self.graph.name
        self._staging: Path | None = None

    def lookup(self) -> Path | None:
        """The optimised graph, if a complete and unchanged entry exists."""
        try:
            record = json.loads((self.entry / _RECORD).read_text())
            files = {name: _stat(self.entry / name) for name in record["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.model if files == record["files"] else None

    def staging_model(self) -> Path | None:
        """Where ORT should write the optimised graph now (None: the cache cannot be written)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._staging = Path(tempfile.mkdtemp(prefix=f".{self.entry.name}-", dir=self.root))
        except OSError:
            return None
        return self._staging / self.graph.name

    def commit(self) -> None:
        """Record what ORT wrote and move it into place (a concurrent writer's entry wins)."""
        staging, self._staging = self._staging, None
        if staging is None:
            return
        try:
            files = {p.name: _stat(p) for p in staging.iterdir() if p.is_file()}
            if self.graph.name not in files:
                raise OSError("ORT wrote no optimised graph")
            (staging / _RECORD).write_text(json.dumps({"source": str(self.graph), "sources": self.sources,
                                                       "files": files}))
            if self.entry.exists():
                shutil.rmtree(self.entry, ignore_errors=True)
            os.replace(staging, self.entry)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            return
        prune_stale(self.root, keep=self.entry)

    def discard(self) -> None:
        """Drop a staging folder (session creation failed) or an entry that failed to load."""
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        else:
            shutil.rmtree(self.entry, ignore_errors=True)


def _is_stale(entry: Path) -> bool:
    """True for an entry that no lookup can hit again: its source files are gone or changed."""
    try:
        record = json.loads((entry / _RECORD).read_text())
    except (OSError, ValueError):
        return False  # being written by another process, or not ours: leave it
    sources = record.get("sources") if isinstance(record, dict) else None
    if not isinstance(sources, dict):  # an entry written before sources were recorded
        source = record.get("source") if isinstance(record, dict) else None
        return isinstance(source, str) and not Path(source).exists()
    for path, stat in sources.items():
        try:
            if _stat(Path(path)) != stat:
                return True
        except OSError:
            return True
    return False


def prune_stale(root: str | os.PathLike, keep: Path | None = None) -> list[Path]:
    """Remove the entries of ``root`` whose sources are gone or changed, and old staging folders."""
    import time

    removed: list[Path] = []
    try:
        children = list(Path(root).iterdir())
    except OSError:
        return removed
    now = time.time()
    for child in children:
        if child == keep or not child.is_dir():
            continue
        try:
            if child.name.startswith("."):
                stale = now - child.stat().st_mtime > _STAGING_MAX_AGE_S
            else:
                stale = _is_stale(child)
        except OSError:
            continue
        if stale:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed
