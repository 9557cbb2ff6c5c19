"""Shared by the decode-step experiments (``cross_kv_uint8.py``, ``cache_layout.py``): their
command line and the FP32 / INT8 bundles they rewrite."""
from __future__ import annotations

import argparse
from pathlib import Path


def step_args(doc: str, json_default: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset-model", default="coca_ViT-B-32", help="architecture preset (test-tiny to smoke-test)")
    ap.add_argument("--work", help="folder for the FP32 / INT8 bundles (reused when present; default: a temp dir)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--past", type=int, default=15)
    ap.add_argument("--runs", type=int, default=15, help="interleaved timing runs per variant and batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--caption-runs", type=int, default=5, help="interleaved captioning runs (cache_layout.py)")
    ap.add_argument("--json", default=json_default)
    return ap.parse_args()


def fp32_and_int8_bundles(preset_model: str, work: Path, cache_layout: str = "per-layer") -> tuple[Path, Path]:
    """``work/fp32`` (random weights, seed 0) and ``work/int8`` (``cpu`` preset INT8), each
    made unless it is already there (``-stacked`` folders for ``cache_layout="stacked"``)."""
    from coca_edge.quantize import quantize
    from coca_edge.quantize.presets import preset_plan

    suffix = "" if cache_layout == "per-layer" else f"-{cache_layout}"
    fp32, int8 = work / f"fp32{suffix}", work / f"int8{suffix}"
    if (fp32 / "manifest.json").exists():
        import json

        inputs = [t["name"] for t in json.loads((fp32 / "manifest.json").read_text())["graphs"]["decoder"]["inputs"]]
        if ("past_text" in inputs) != (cache_layout == "stacked"):
            raise SystemExit(f"{fp32} was exported with another cache layout than {cache_layout}; "
                             "remove it or choose another --work")
    if not (fp32 / "manifest.json").exists():
        import torch

        from coca_edge.exporters.bundle import export_bundle
        from coca_edge.models import CoCa, get_preset

        torch.manual_seed(0)
        export_bundle(CoCa(get_preset(preset_model)).eval(), fp32, cache_layout=cache_layout,
                      source_model={"preset": preset_model, "weights": "random(seed=0)"})
    if not (int8 / "manifest.json").exists():
        quantize(fp32, preset_plan("cpu", "int8"), int8, None, progress=True)
    return fp32, int8
