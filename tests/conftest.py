"""Shared fixtures: tiny seeded models only (see STYLE: 32 px, 2 layers, width 64)."""
from __future__ import annotations

import pytest
import torch

from coca_edge.models import CoCa, get_preset


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
