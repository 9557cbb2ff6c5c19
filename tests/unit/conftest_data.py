"""Fixture builders for the data tests (imported explicitly: ``from tests.unit.conftest_data import ...``).

Every file is made by the tests themselves, small, in a temporary folder.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like uint8 RGB array (gradients plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=2)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int = 0, fmt: str = "PNG", size: tuple[int, int] = (48, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(photo(*size, seed=seed), fmt))
    return path


def truncated_jpeg() -> bytes:
    data = encode(photo(96, 128, seed=3), "JPEG")
    return data[: len(data) // 2]


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit PNG of width*height pixels (100 MP by default, beyond Pillow's and
    our 89.5 MP limit) that is only ~15 kB on disk: a decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_csv(path: Path, rows: list[tuple[str, str]], header=("filepath", "title"), sep="\t") -> Path:
    lines = [sep.join(header)] + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_coco(root: Path, n_images: int = 4, captions_per_image: int = 3, split: str = "val2017") -> Path:
    """annotations/captions_<split>.json + <split>/*.jpg, COCO layout."""
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        write_image(root / split / name, seed=i, fmt="JPEG")
        images.append({"id": 100 + i, "file_name": name, "width": 64, "height": 48})
        for k in range(captions_per_image):
            annotations.append({"id": 1000 + 10 * i + k, "image_id": 100 + i, "caption": f"image {i} caption {k}"})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"captions_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_wds(root: Path, n_shards: int = 2, per_shard: int = 5) -> list[Path]:
    """Shards root/{00000..}.tar: jpg+txt, png+json, webp+txt samples in turn."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        members = []
        for k in range(per_shard):
            key = f"s{s}_{k:04d}"
            img = photo(40, 52, seed=s * 100 + k)
            kind = k % 3
            if kind == 0:
                members += [(f"{key}.jpg", encode(img, "JPEG")), (f"{key}.txt", f"shard {s} sample {k}".encode())]
            elif kind == 1:
                members += [(f"{key}.png", encode(img, "PNG")), (f"{key}.json", json.dumps({"caption": f"shard {s} sample {k}", "tag": k}).encode())]
            else:
                members += [(f"{key}.webp", encode(img, "WEBP")), (f"{key}.txt", f"shard {s} sample {k}".encode())]
        paths.append(write_tar(root / f"{s:05d}.tar", members))
    return paths


def write_idx(path: Path, arr: np.ndarray) -> Path:
    """IDX file (gzipped when the name ends in .gz), as Fashion-MNIST ships them."""
    import gzip

    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    data = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path
