"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files under
/usr/share/datasets), for zero-shot classification on real photographs of clothes.

Optional: nothing is downloaded; ``find_fashion_mnist()`` returns None when the files
are absent and callers (and tests) skip.
"""
from __future__ import annotations

import gzip
import os
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .readers import DataError, Sample
from .tasks import IndexedSamples, ZeroShotTask, fill_templates

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_TEMPLATES",
    "DEFAULT_ROOTS",
    "FashionMNIST",
    "find_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES = (
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FASHION_MNIST_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
)
DEFAULT_ROOTS = ("/usr/share/datasets",)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"{path}: header says {shape} ({expected} bytes), file has {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_file(folder: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def find_fashion_mnist(roots: Sequence[str | os.PathLike[str]] | str | None = None) -> str | None:
    """The folder holding Fashion-MNIST's test IDX files under ``roots`` (searched
    recursively, folders named like 'fashion' first), or None."""
    if roots is None:
        roots = DEFAULT_ROOTS
    elif isinstance(roots, (str, os.PathLike)):
        roots = (roots,)
    found = []
    for root in roots:
        for dirpath, dirnames, _ in os.walk(os.fspath(root)):
            dirnames.sort()
            if _find_file(dirpath, _FILES["test"][0]) and _find_file(dirpath, _FILES["test"][1]):
                found.append(dirpath)
    found.sort(key=lambda p: ("fashion" not in p.lower(), p))
    return found[0] if found else None


class FashionMNIST:
    """One split ('train' or 'test') as random-access ``Sample``s: 28x28 grayscale as RGB
    PIL images (or ``transform`` of them), ``meta['label']`` and ``meta['classname']``."""

    name = "fashion-mnist"

    def __init__(
        self,
        split: str = "test",
        root: str | os.PathLike[str] | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        classnames: Sequence[str] = FASHION_MNIST_CLASSES,
        templates: Sequence[str] = FASHION_MNIST_TEMPLATES,
    ):
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if root is not None and _find_file(os.fspath(root), _FILES[split][0]):
            folder: str | None = os.fspath(root)
        else:
            folder = find_fashion_mnist(root)
        if folder is None:
            where = root if root is not None else " or ".join(DEFAULT_ROOTS)
            raise DataError(
                f"Fashion-MNIST IDX files not found under {where}; install the Debian package dataset-fashion-mnist"
            )
        paths = [_find_file(folder, stem) for stem in _FILES[split]]
        if None in paths:
            raise DataError(f"Fashion-MNIST {split} files {_FILES[split]} not found in {folder}")
        self.images = read_idx(paths[0])
        self.labels = read_idx(paths[1]).astype(np.int64)
        if self.images.ndim != 3 or self.images.dtype != np.uint8 or len(self.images) != len(self.labels):
            raise DataError(f"{paths}: expected uint8 [N, H, W] images and N labels")
        if len(classnames) != 10 or self.labels.min(initial=0) < 0 or self.labels.max(initial=0) > 9:
            raise DataError("Fashion-MNIST has 10 classes, labels 0..9")
        self.split, self.folder, self.transform = split, folder, transform
        self.classnames, self.templates = tuple(classnames), tuple(templates)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Sample:
        label = int(self.labels[index])
        img: Any = Image.fromarray(np.repeat(self.images[index][..., None], 3, axis=2))
        if self.transform is not None:
            img = self.transform(img)
        name = self.classnames[label]
        return Sample(img, self.templates[0].format(name), f"{self.name}/{self.split}/{index}", {"label": label, "classname": name})

    def zero_shot_task(self, n: int | None = None) -> ZeroShotTask:
        """The first ``n`` images (all by default) as a zero-shot task with class-name prompts."""
        count = len(self) if n is None else min(n, len(self))
        return ZeroShotTask(
            "fashion-mnist",
            self.classnames,
            fill_templates(self.classnames, self.templates),
            IndexedSamples(self, range(count)),
            tuple(int(v) for v in self.labels[:count]),
            "Fashion-MNIST class (10 kinds of clothing)",
        )
