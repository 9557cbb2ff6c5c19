"""The device install: `pip install -c constraints.txt ".[ort]"` into a fresh venv, no torch.

A bundle exported here (main venv) captions there with the same tokens. CI (.ci/run) creates
that venv with the README's device command and points ``COCA_EDGE_DEVICE_VENV`` at it; without
the variable the test builds its own in a temp dir (about 15 s from pip's cache / local index).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coca_edge.runtime import EdgeCoCa

ROOT = Path(__file__).resolve().parents[2]


def _source_copy(dest: Path) -> Path:
    """The package sources (tracked and new, not ignored) copied out, so the wheel build leaves
    nothing in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in files:
        if rel and not rel.startswith(("tests/", "benchmarks/", "recipes/", "docs/")) and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    given = os.environ.get("COCA_EDGE_DEVICE_VENV")
    if given:
        return Path(given).resolve()
    tmp = tmp_path_factory.mktemp("device")
    src = _source_copy(tmp / "src")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"),
                             f"{src}[ort]"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def test_device_install_has_no_torch(device_venv):
    python = str(device_venv / "bin" / "python")
    for module in ("torch", "onnx", "yaml"):
        result = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert result.returncode != 0 and "No module named" in result.stderr, f"{module} is importable on the device"
    result = subprocess.run([python, "-c", "import onnxruntime, coca_edge.runtime"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bundle_exported_here_captions_there_with_the_same_tokens(device_venv, tiny_bundle, tmp_path):
    bundle = tiny_bundle[0]
    images = []
    for i, colour in enumerate([(200, 30, 30), (20, 180, 60), (240, 240, 240)]):
        images.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((40, 56, 3), colour, np.uint8)).save(images[-1])
    here = EdgeCoCa.load(bundle).caption_ids(images, max_new_tokens=8).sequences
    code = ("import json, sys; from coca_edge.runtime import EdgeCoCa; "
            "m = EdgeCoCa.load(sys.argv[1]); "
            "print(json.dumps(m.caption_ids(sys.argv[2:], max_new_tokens=8).sequences)); "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([str(device_venv / "bin" / "python"), "-c", code, str(bundle), *images],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == here
    cli = subprocess.run([str(device_venv / "bin" / "coca-edge"), "caption", str(bundle), *images,
                          "--max-new-tokens", "8", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    expected = EdgeCoCa.load(bundle).caption(images, max_new_tokens=8)
    assert [r["caption"] for r in json.loads(cli.stdout)] == expected


def test_device_cli_names_the_extra_for_the_rest(device_venv, tmp_path):
    result = subprocess.run([str(device_venv / "bin" / "coca-edge"), "export", "test-tiny", "--out",
                             str(tmp_path / "b")], capture_output=True, text=True)
    assert result.returncode == 2
    assert 'pip install "coca-edge[torch]"' in result.stderr
    assert not (tmp_path / "b").exists()
