"""Zero-copy views of an ONNX graph's weights, for sharing them across a bundle's sessions.

ONNX Runtime copies every initializer of every session into its own memory. The text
tower's weights sit in both the ``text_encoder`` and the ``decoder`` graph, so a bundle
holds them twice. ``SessionOptions.add_initializer`` lets sessions use caller-owned
buffers instead: this module maps the graph files read-only and returns numpy views of
their initializers (no copy), deduplicated by content across graphs.

The runtime must not depend on the ``onnx`` package (about 20 MB installed on a device,
for reading a few field offsets), so the ONNX protobuf wire format is walked here
directly: ``ModelProto.graph`` (field 7) -> ``GraphProto.initializer`` (field 5) ->
``TensorProto`` dims (1), data_type (2), name (8), raw_data (9), external_data (13),
data_location (14). Tensors this reader does not understand are simply left to ORT.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["Initializer", "read_initializers", "share_initializers"]

# ONNX TensorProto.DataType -> numpy dtype, for the types numpy has.
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
           9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
# Tensors smaller than this stay inside ORT: one OrtValue each costs more bookkeeping than it saves.
MIN_SHARED_BYTES = 64 * 1024


@dataclass(frozen=True)
class Initializer:
    name: str
    array: np.ndarray  # read-only view into a memory-mapped file
    external: bool     # stored in an external data file (else inside the .onnx protobuf)
    source: mmap.mmap
    offset: int

    def release(self) -> None:
        """Drop this tensor's pages from the process (they stay in the page cache and fault back
        in on use): comparing tensors reads them, running the graph may need only a few rows."""
        page = mmap.PAGESIZE
        start = -(-self.offset // page) * page
        end = (self.offset + self.array.nbytes) // page * page
        if end > start and hasattr(mmap, "MADV_DONTNEED"):  # not on Windows: pages then just stay
            self.source.madvise(mmap.MADV_DONTNEED, start, end - start)


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) for each field in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value, pos
        elif wire == 1:
            yield field, wire, pos, pos + 8
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield field, wire, pos, pos + length
            pos += length
        elif wire == 5:
            yield field, wire, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")


def _tensor(buf, start: int, end: int) -> dict:
    t: dict = {"dims": [], "external": {}}
    for field, wire, a, b in _fields(buf, start, end):
        if field == 1 and wire == 0:
            t["dims"].append(a)
        elif field == 1 and wire == 2:  # packed dims
            pos = a
            while pos < b:
                value, pos = _varint(buf, pos)
                t["dims"].append(value)
        elif field == 2 and wire == 0:
            t["data_type"] = a
        elif field == 8 and wire == 2:
            t["name"] = bytes(buf[a:b]).decode()
        elif field == 9 and wire == 2:
            t["raw"] = (a, b - a)
        elif field == 13 and wire == 2:
            entry = {f: bytes(buf[x:y]).decode() for f, _, x, y in _fields(buf, a, b)}
            t["external"][entry.get(1, "")] = entry.get(2, "")
        elif field == 14 and wire == 0:
            t["data_location"] = a
        elif field in (4, 5, 6, 7, 10, 11) and b > a:
            t["typed_data"] = True  # values in typed fields, not raw bytes: leave to ORT
    return t


def _view(mapped: mmap.mmap, dtype, dims: list[int], offset: int, nbytes: int) -> np.ndarray | None:
    dtype = np.dtype(dtype)
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if count * dtype.itemsize != nbytes:
        return None  # inconsistent sizes: leave the tensor to ORT
    # May be misaligned (protobuf puts raw bytes anywhere): numpy reads it, ORT is never given it.
    return np.ndarray(tuple(dims), dtype=dtype, buffer=mapped, offset=offset)


def read_initializers(path: str | os.PathLike, min_bytes: int = MIN_SHARED_BYTES) -> list[Initializer]:
    """Read-only, zero-copy views of the initializers of an ONNX file (embedded or external data)."""
    path = Path(path)
    maps: dict[Path, mmap.mmap] = {}

    def mapped(file: Path) -> mmap.mmap:
        if file not in maps:
            with open(file, "rb") as f:
                maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return maps[file]

    buf = mapped(path)
    out = []
    graphs = [(a, b) for field, wire, a, b in _fields(buf, 0, len(buf)) if field == 7 and wire == 2]
    for g_start, g_end in graphs:
        for field, wire, a, b in _fields(buf, g_start, g_end):
            if field != 5 or wire != 2:
                continue
            t = _tensor(buf, a, b)
            dtype = _DTYPES.get(t.get("data_type", 0))
            if dtype is None or "name" not in t or t.get("typed_data"):
                continue
            if t.get("data_location") == 1:  # EXTERNAL
                location = t["external"].get("location")
                if not location:
                    continue
                file = path.parent / location
                offset = int(t["external"].get("offset", 0))
                nbytes = int(t["external"].get("length", file.stat().st_size - offset))
                source, external = mapped(file), True
            elif "raw" in t:
                (offset, nbytes), source, external = t["raw"], buf, False
            else:
                continue
            array = _view(source, dtype, t["dims"], offset, nbytes)
            if array is not None and array.nbytes >= min_bytes:
                out.append(Initializer(t["name"], array, external, source, offset))
    return out


def share_initializers(paths: dict[str, str | os.PathLike], min_bytes: int = MIN_SHARED_BYTES
                       ) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Per graph, ``(initializer name, array)`` pairs to hand to ``SessionOptions.add_initializer``.

    Tensors with equal dtype, shape and bytes in several graphs get the same array, so every
    session reads one copy; every array is a view of the mapped file, so none is copied. Only
    external-data tensors are handed over: ORT keeps the parsed protobuf of an inline graph
    (weights included) whatever the session is given, so sharing those would add, not save.
    """
    unique: dict[tuple, list[Initializer]] = {}
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for graph, path in paths.items():
        pairs = []
        for init in read_initializers(path, min_bytes):
            if not init.external or not init.array.flags.aligned:
                continue
            flat = init.array.reshape(-1).view(np.uint8)
            # A cheap fingerprint first, so that only likely-equal tensors are compared in full.
            key = (init.array.dtype.str, init.array.shape, flat[:256].tobytes(), flat[-256:].tobytes())
            candidates = unique.setdefault(key, [])
            same = next((c for c in candidates if np.array_equal(c.array, init.array)), None)
            if same is None:
                candidates.append(init)
                same = init
            elif same is not init:
                same.release()
            init.release()
            pairs.append((init.name, same.array))
        out[graph] = pairs
    return out
