"""Dependency layout (pyproject.toml) and the CLI on an install without torch."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# What `pip install "coca-edge[ort]"` does not bring: importing any of these must not be needed.
NOT_ON_DEVICE = ("torch", "torchvision", "open_clip", "onnx", "onnxscript", "yaml", "tqdm", "safetensors",
                 "matplotlib", "webdataset", "tensorboard", "transformers")
BLOCK = textwrap.dedent(f"""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split('.')[0] in {NOT_ON_DEVICE!r}:
                raise ModuleNotFoundError('No module named ' + repr(name), name=name)
    sys.meta_path.insert(0, _Block())
    from coca_edge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _extra(name: str) -> set[str]:
    """Distributions an extra brings, following self-references like coca-edge[torch,ort]."""
    out = set()
    for req in PROJECT["optional-dependencies"][name]:
        if _name(req) == "coca-edge":
            for sub in req[req.index("[") + 1:req.index("]")].split(","):
                out |= _extra(sub.strip())
        else:
            out.add(_name(req))
    return out


def test_base_install_is_the_device_runtime():
    base = {_name(r) for r in PROJECT["dependencies"]}
    assert base == {"numpy", "pillow", "ftfy", "regex"}
    assert _extra("ort") == {"onnxruntime"} and _extra("ort-gpu") == {"onnxruntime-gpu"}


def test_full_toolkit_extras_keep_the_readme_commands_working():
    # README: pip install -c constraints.txt -e ".[cpu]" / ".[cpu,test]" install the whole CPU toolkit
    assert {"torch", "onnx", "onnxscript", "onnxruntime", "pyyaml", "tqdm", "safetensors"} <= _extra("cpu")
    assert {"torch", "onnx", "onnxscript", "onnxruntime-gpu"} <= _extra("gpu")
    for name in PROJECT["optional-dependencies"]:
        # the two ORT wheels install into the same folder and overwrite each other (FACTS.md)
        assert not {"onnxruntime", "onnxruntime-gpu"} <= _extra(name), name
        assert not ({"onnxruntime", "onnxruntime-gpu"} & _extra(name)) or name in ("ort", "ort-gpu", "cpu", "gpu")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, cwd=cwd)


def test_cli_without_torch_lists_every_command_and_says_what_to_install():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"caption\s+caption images", result.stdout)
    assert re.search(r"export\s+\(not installed: needs coca-edge\[torch\]\)", result.stdout)
    assert re.search(r"train\s+\(not installed: needs coca-edge\[torch\]\)", result.stdout)
    for args in (["export", "test-tiny", "--out", "x"], ["export", "--help"], ["models"]):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "which this install does not have" in result.stderr and 'pip install "coca-edge[torch]"' in \
            result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_cli_without_torch_captions(tiny_bundle, tmp_path):
    Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(tmp_path / "a.png")
    result = _cli("caption", str(tiny_bundle[0]), str(tmp_path / "a.png"), "--max-new-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    assert '"caption"' in result.stdout
