"""``coca-edge quantize``: FP32 bundle -> FP16 / INT8 / INT4 bundle, optionally accuracy-gated."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register", "quantize_from_args"]

_EXAMPLES = """\
examples:
  coca-edge quantize bundles/demo --precision int8 --preset cpu --out bundles/demo-int8
  coca-edge quantize bundles/demo --precision int8 --method static --preset cpu \\
      --calib synthetic-scenes:train --calib-samples 256 --out bundles/demo-int8-static
  coca-edge quantize bundles/demo --precision int4 --preset cpu --out bundles/demo-int4
  coca-edge quantize bundles/demo --precision int8 --preset tensorrt --calib synthetic-scenes:train \\
      --out bundles/demo-trt-int8
  coca-edge quantize bundles/demo --precision fp16 --preset gpu-fp16 --out bundles/demo-fp16
  coca-edge quantize bundles/demo --precision int8 --method static --preset cpu --gates cpu-int8 \\
      --eval synthetic-scenes:val --out bundles/demo-int8-auto     # accuracy-aware fallback

exit status: 0 ok, 1 no mix of precisions passes --gates (nothing written), 2 bad input.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from .presets import METHODS, PRECISIONS, PRESETS

    p = sub.add_parser(
        "quantize", help="quantize an FP32 bundle (FP16, INT8 dynamic/static, INT4 weight-only)",
        description="Quantize every graph of an FP32 bundle into a new bundle that EdgeCoCa runs unchanged. "
                    "A preset chooses per graph the method measured best for a target (docs/quantization.md); "
                    "with --gates, nodes fall back to FP32 until the gates pass.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="FP32 bundle directory (from `coca-edge export`)")
    p.add_argument("--precision", required=True, choices=PRECISIONS)
    p.add_argument("--method", choices=METHODS, help="INT8 method (default: the preset's choice)")
    p.add_argument("--preset", default="cpu", help=f"target: {', '.join(PRESETS)} (default cpu)")
    p.add_argument("--fuse-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite the decoder's attention into ORT's MultiHeadAttention (needs onnxruntime >= 1.20; "
                        "default: the preset's choice, on for cpu int8/int4)")
    p.add_argument("--calib", default="synthetic-scenes:train",
                   help="calibration data for static INT8: synthetic-scenes:SPLIT, a CSV/TSV, a COCO captions JSON "
                        "or an image folder (default synthetic-scenes:train)")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration images/captions (default 256)")
    p.add_argument("--gates", help="gates file or named gate set: fall back nodes until they pass")
    p.add_argument("--eval", default="synthetic-scenes:val", help="evaluation data for --gates")
    p.add_argument("--eval-samples", type=int, default=64, help="evaluation samples for --gates (default 64)")
    p.add_argument("--max-fallback-nodes", type=int, default=32, help="most nodes returned to FP32 (default 32)")
    p.add_argument("--cache-dir", help="calibration range cache (default $COCA_EDGE_CACHE or ~/.cache/coca-edge)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--json", action="store_true", help="print the per-graph summary as JSON")
    p.set_defaults(func=_run)


def quantize_from_args(bundle: str, precision: str, out: str, preset: str = "cpu", method: str | None = None,
                       calib: str = "synthetic-scenes:train", calib_samples: int = 256, gates: str | None = None,
                       eval_data: str | None = None, eval_samples: int = 64, max_fallback_nodes: int = 32,
                       cache_dir: str | None = None, overwrite: bool = False, progress: bool = True,
                       fuse_attention: bool | None = None) -> Path:
    """What ``coca-edge quantize`` does, as a call (the pipeline's quantize stage uses it).

    Raises ``QuantizeError`` / ``CalibrationError`` / ``BundleError`` on bad input and
    ``FallbackFailed`` when no mix passes ``gates``."""
    from coca_edge.calibration import CalibrationData

    from .api import quantize
    from .config import AutoFallbackConfig
    from .presets import preset_plan

    plan = preset_plan(preset, precision, method, fuse_attention=fuse_attention)
    data = CalibrationData.parse(calib, calib_samples)
    config = plan if not gates else AutoFallbackConfig(
        base=plan, gates=gates, eval_data=eval_data or "synthetic-scenes:val", eval_samples=eval_samples,
        max_nodes=max_fallback_nodes)
    return quantize(bundle, config, out, data, overwrite=overwrite, progress=progress, cache_dir=cache_dir)


def _run(args: argparse.Namespace) -> int:
    from coca_edge.calibration import CalibrationError
    from coca_edge.runtime.bundle import BundleError

    from .config import QuantizeError

    try:
        out = quantize_from_args(args.bundle, args.precision, args.out, args.preset, args.method, args.calib,
                                 args.calib_samples, args.gates, args.eval, args.eval_samples,
                                 args.max_fallback_nodes, args.cache_dir, args.overwrite, progress=not args.json,
                                 fuse_attention=args.fuse_attention)
    except _fallback_failed() as err:
        print(f"coca-edge quantize: {err}", file=sys.stderr)
        return 1
    except (QuantizeError, CalibrationError, BundleError, FileNotFoundError) as err:
        print(f"coca-edge quantize: error: {err}", file=sys.stderr)
        return 2
    _report(out, args.json)
    return 0


def _fallback_failed() -> type:
    from .fallback import FallbackFailed

    return FallbackFailed


def _report(out, as_json: bool) -> None:
    from coca_edge.runtime.bundle import Bundle, BundleError

    bundle = Bundle.load(out, verify_hashes=False)
    manifest = bundle.manifest
    try:  # the FP32 bundle it came from, for the size ratio (it may have moved since)
        source = Bundle.load(manifest["quantization"]["source_bundle"]["path"], verify_hashes=False)
    except (BundleError, OSError):
        source = None
    rows = {}
    for name, g in manifest["graphs"].items():
        q = g["quantization"]
        rows[name] = {"precision": g["precision"], "method": q["method"], "bytes": bundle.graph_bytes(name),
                      "fp32_bytes": source.graph_bytes(name) if source and name in source.manifest["graphs"] else None,
                      "excluded_nodes": q["excluded_nodes"],
                      "calibration": q.get("calibration", {}).get("cache")}
    summary = {"bundle": str(out), "graphs": rows, "fallback": manifest["quantization"].get("fallback")}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"bundle written to {out}")
    for name, r in rows.items():
        ratio = f"{r['bytes'] / r['fp32_bytes']:.2f}x FP32" if r["fp32_bytes"] else ""
        calib = f", calibration cache {r['calibration']}" if r["calibration"] else ""
        fell = f", {len(r['excluded_nodes'])} node(s) kept FP32" if r["excluded_nodes"] else ""
        print(f"  {name:<14} {r['precision']:<17} {r['bytes'] / 1e6:8.2f} MB {ratio}{calib}{fell}")
    fallback = summary["fallback"]
    if fallback:
        for step in fallback.get("steps", []):
            print(f"  fallback: {step['summary']}")
