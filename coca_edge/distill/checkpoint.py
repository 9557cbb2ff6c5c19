"""Training checkpoints: written atomically, verified on load, keep-last-N.

Layout of ``<output_dir>/checkpoints``::

    step-00000500/
        model.safetensors    student weights (coca-edge native names; loadable by
        config.json          ``coca_edge.models.openclip.load_checkpoint``)
        extra.safetensors    trainer-only modules (feature-KD projections), may be absent
        state.pt             optimizer state, RNG states
        meta.json            step, samples seen, train config, sha256 of every file above
    latest                   name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, then ``latest``
is replaced atomically: a crash or a full disk at any moment leaves ``latest`` pointing at
the previous complete checkpoint and no half-written ``step-*`` directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointCorruptError", "CheckpointSaveError", "LoadedCheckpoint", "save_checkpoint",
           "load_checkpoint_dir", "resolve_resume", "list_checkpoints"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointCorruptError(RuntimeError):
    """A checkpoint on disk is incomplete or does not match its recorded hashes."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (e.g. the disk is full); the previous one is untouched."""


@dataclass
class LoadedCheckpoint:
    path: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]
    state: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def save_checkpoint(root: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor], model_config_json: str,
                    extra_state: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any],
                    keep_last: int) -> Path:
    """Write ``step-<step>`` atomically, point ``latest`` at it, prune to ``keep_last``."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        files = {
            "model.safetensors": lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(p)),
            "config.json": lambda p: p.write_text(model_config_json),
            "state.pt": lambda p: torch.save(state, p),
        }
        if extra_state:
            files["extra.safetensors"] = lambda p: save_file(
                {k: v.detach().cpu().contiguous() for k, v in extra_state.items()}, str(p))
        hashes = {}
        for fname, write in files.items():
            _write_file(tmp / fname, write)
            hashes[fname] = _sha256(tmp / fname)
        record = {"format_version": FORMAT_VERSION, "step": step, **meta, "files": hashes}
        _write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(record, indent=2)))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / f".latest-{os.getpid()}"
        _write_file(latest_tmp, lambda p: p.write_text(name + "\n"))
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        for leftover in root.glob(f".latest-{os.getpid()}"):
            leftover.unlink(missing_ok=True)
        raise CheckpointSaveError(
            f"could not write checkpoint {final} ({err}); 'latest' still points at the previous checkpoint") from err
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(root: str | os.PathLike, resume: str) -> Path | None:
    """``resume='latest'``: the checkpoint ``latest`` names under ``root`` (None if there is
    none yet); otherwise ``resume`` is a checkpoint directory."""
    root = Path(root)
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointCorruptError(f"checkpoint directory not found: {path}")
        return path
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not _NAME.match(name) or not path.is_dir():
        raise CheckpointCorruptError(f"{pointer} names {name!r}, which is not a checkpoint directory under {root}")
    return path


def _previous_hint(path: Path) -> str:
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    if not older:
        return "no older checkpoint is available"
    return f"the previous checkpoint {older[-1]} is still there: resume from it with --resume {older[-1]}"


def load_checkpoint_dir(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read and verify a checkpoint; :class:`CheckpointCorruptError` names the bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointCorruptError(f"checkpoint {path}: cannot read meta.json ({err}); {_previous_hint(path)}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointCorruptError(f"checkpoint {path}: format version {meta.get('format_version')} "
                                     f"(this coca-edge reads {FORMAT_VERSION})")
    for fname, digest in meta.get("files", {}).items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointCorruptError(f"checkpoint {path}: {fname} is missing; {_previous_hint(path)}")
        if _sha256(fpath) != digest:
            raise CheckpointCorruptError(
                f"checkpoint {path}: {fname} does not match its recorded sha256 (corrupted or modified); "
                f"{_previous_hint(path)}")
    try:
        model = load_file(str(path / "model.safetensors"))
        extra = load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").is_file() else {}
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointCorruptError(f"checkpoint {path}: unreadable ({err}); {_previous_hint(path)}") from None
    return LoadedCheckpoint(path, meta, model, extra, state)
