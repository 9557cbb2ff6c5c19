"""Fashion-MNIST loader on IDX files the test writes; the real Debian package when present."""
from __future__ import annotations

import numpy as np
import pytest

from tests.unit.conftest_data import write_idx
from coca_edge.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_TEMPLATES,
    FashionMNIST,
    find_fashion_mnist,
    read_idx,
)
from coca_edge.data.readers import DataError


@pytest.fixture()
def fake_root(tmp_path):
    folder = tmp_path / "datasets" / "fashion-mnist"
    rng = np.random.default_rng(0)
    for prefix, n in (("t10k", 12), ("train", 20)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return tmp_path / "datasets"


def test_reads_idx_and_builds_zero_shot_task(fake_root):
    assert find_fashion_mnist(fake_root).endswith("fashion-mnist")
    ds = FashionMNIST("test", fake_root)
    assert len(ds) == 12
    sample = ds[3]
    assert sample.image.mode == "RGB" and sample.image.size == (28, 28)
    assert sample.meta["label"] == 3 and sample.meta["classname"] == FASHION_MNIST_CLASSES[3]
    assert len(FashionMNIST("train", fake_root)) == 20
    task = ds.zero_shot_task(n=10)
    assert task.labels == tuple(range(10)) and len(task.prompts) == 10
    assert task.prompts[9] == tuple(t.format("ankle boot") for t in FASHION_MNIST_TEMPLATES)


def test_absent_or_broken(tmp_path):
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        FashionMNIST("test", tmp_path)
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DataError, match="header"):
        read_idx(bad)
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(bad)


def test_real_package_when_installed():
    root = find_fashion_mnist()
    if root is None:
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    ds = FashionMNIST("test")
    assert len(ds) == 10_000 and ds[0].image.size == (28, 28)
    assert sorted(set(ds.labels.tolist())) == list(range(10))
