"""Shared fixtures: tiny seeded models only (see STYLE: 32 px, 2 layers, width 64)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from coca_edge.models import CoCa, get_preset

# Caches that loading bundles writes (verified hashes, ORT-optimised graphs, calibration ranges)
# go to a folder of this test run, not the user's ~/.cache; subprocesses inherit it.
# Removed when the run ends: ORT's optimised graphs alone reach ~1.8 GB over the suite.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="coca-edge-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("test-tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return CoCa(tiny_config).eval()


@pytest.fixture()
def tiny_pixels(tiny_config):
    g = torch.Generator().manual_seed(1)
    s = tiny_config.vision.image_size
    return torch.randn(3, 3, s, s, generator=g)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A test-tiny bundle exported once per session (seeded weights), with its PyTorch model."""
    from coca_edge.exporters.bundle import export_bundle

    torch.manual_seed(0)
    model = CoCa(get_preset("test-tiny")).eval()
    path = export_bundle(model, tmp_path_factory.mktemp("bundles") / "tiny", progress=False)
    return path, model



def _last_matmul(path):
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"][-1]


@pytest.fixture(scope="session")
def tiny_fp16_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle quantized with coca_edge.quantize's ``tensorrt`` preset at FP16."""
    from coca_edge.quantize import preset_plan, quantize

    return quantize(tiny_bundle[0], preset_plan("tensorrt", "fp16"), tmp_path_factory.mktemp("bundles") / "tiny-fp16",
                    progress=False)


@pytest.fixture(scope="session")
def tiny_int8_trt_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle quantized with the ``tensorrt`` preset at INT8 (static QDQ, 8 synthetic-scenes
    calibration images); the decoder's logits MatMul is excluded (kept FP32, as a fallback would)."""
    from coca_edge.quantize import preset_plan, quantize

    plan = preset_plan("tensorrt", "int8")
    plan["decoder"] = plan["decoder"].with_excluded((_last_matmul(tiny_bundle[0] / "decoder.onnx"),))
    return quantize(tiny_bundle[0], plan, tmp_path_factory.mktemp("bundles") / "tiny-int8-trt",
                    calib="synthetic-scenes:train", calib_samples=8, progress=False)


@pytest.fixture(scope="session")
def tiny_int8_ort_bundle(tiny_bundle, tmp_path_factory):
    """TensorRT-style INT8 QDQ made directly with ORT's quantize_static (per-channel on the last axis)."""
    from tests.unit.trt_bundles import derive_bundle

    return derive_bundle(tiny_bundle[0], tmp_path_factory.mktemp("bundles") / "tiny-int8-ort")
