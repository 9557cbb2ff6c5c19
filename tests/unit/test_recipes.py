"""Every recipe in recipes/ loads and is checked; its header comment names the command that runs it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coca_edge.distill.config import load_config
from coca_edge.pipeline import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
# Recipes whose inputs ship with the project; the others name paths on a user's machine.
SELF_CONTAINED = {"demo.yaml", "quantize-only.yaml", "demo_distill.yaml", "demo_teacher.yaml",
                  "demo_teacher_stage2.yaml"}


def test_recipes_found():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "openclip-coca-b32-edge.yaml", "openclip-coca-l14-jetson-orin.yaml",
            "quantize-only.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_names_its_command(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    data = yaml.safe_load(path.read_text())
    if "stages" in data:
        assert any(f"coca-edge pipeline recipes/{path.name}" in line for line in header), header
        recipe = load_recipe(path, check_paths=path.name in SELF_CONTAINED)
        assert recipe.stages
        if path.name not in SELF_CONTAINED:
            # what a user edits is marked, and it is only paths
            edits = [line for line in path.read_text().splitlines() if "# EDIT" in line and not line.startswith("#")]
            assert edits and all("/" in line.split("#")[0] for line in edits), edits
    else:
        assert any(f"recipes/{path.name}" in line and "coca-edge" in line for line in header), header
        load_config(path)
