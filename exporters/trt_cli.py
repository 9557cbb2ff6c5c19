"""``coca-edge build-engine``: bundle -> TensorRT engines, built on the device (NOT YET RUN ON HARDWARE)."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-engine", help="build TensorRT engines for a bundle on this GPU (TensorRT path: not yet run on hardware)",
        description="Build one TensorRT engine per graph of a bundle, on the device that will run them, into a "
                    "folder with engines.json (TensorRT version, GPU compute capability, profiles). Structural checks "
                    "(ops, Q/DQ rules, profiles) run first and need no TensorRT; the equivalent trtexec command lines "
                    "are printed too. The TensorRT path has not yet been run on hardware: run scripts/gpu-check.sh "
                    "on a device and record the result.",
        epilog="examples (on the GPU device, with TensorRT installed):\n"
               "  coca-edge build-engine bundles/demo --precision fp16\n"
               "  coca-edge build-engine bundles/demo-trt-int8 --precision int8 --max-batch 4\n"
               "  coca-edge build-engine bundles/demo --print-trtexec      # also print the trtexec command lines",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (FP32, FP16, or INT8 quantized with the `tensorrt` preset)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "best"), default="fp16",
                   help="fp16 (default); int8 needs explicit Q/DQ (tensorrt preset) - no implicit calibration; "
                        "best = fp16 + int8")
    p.add_argument("--out", help="engines folder (default: <bundle>.trt-<precision> beside the bundle)")
    p.add_argument("--graphs", help="comma-separated graphs (default: all)")
    p.add_argument("--max-batch", type=int, default=8, help="largest image/text batch per engine run (default 8)")
    p.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes kernels for (default 1)")
    p.add_argument("--num-beams", type=int, default=3,
                   help="largest beam count: the decoder's batch profile is max-batch x num-beams (default 3)")
    p.add_argument("--workspace-mib", type=int, default=2048, help="builder workspace in MiB (default 2048)")
    p.add_argument("--timing-cache", help="timing cache file, reused and updated (default: timing.cache beside --out)")
    p.add_argument("--print-trtexec", action="store_true",
                   help="only run the checks and print the equivalent trtexec commands (no TensorRT needed)")
    p.add_argument("--skip-checks", action="store_true", help="skip the structural checks")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from coca_edge.runtime.bundle import Bundle
    from coca_edge.runtime.trt import TensorRTUnavailableError

    from .tensorrt import BuildConfig, ProfileConfig, build_engines, default_engines_dir, derive_profiles, \
        trtexec_commands
    from .trt_checks import check_bundle

    try:
        profile = ProfileConfig(args.max_batch, args.opt_batch, args.num_beams)
        config = BuildConfig(args.precision, args.workspace_mib, profile, args.timing_cache)
        bundle = Bundle.load(args.bundle)
        profiles = derive_profiles(bundle, profile)
    except (ValueError, FileNotFoundError) as err:
        print(f"coca-edge build-engine: error: {err}", file=sys.stderr)
        return 2
    out = args.out or str(default_engines_dir(bundle.root, args.precision))
    summary: dict = {"bundle": str(bundle.root), "out": out, "precision": args.precision,
                     "trtexec": trtexec_commands(bundle, out, config, profiles)}
    if not args.skip_checks:
        found = check_bundle(bundle, profiles, profile.max_batch, profile.num_beams)
        summary["checks"] = {g: [str(v) for v in vs] for g, vs in found.items()}
        failed = [v for vs in found.values() for v in vs]
        if failed:
            _print(args, summary, f"{len(failed)} structural check(s) failed; TensorRT would reject or mis-quantize "
                                  "these graphs:\n  " + "\n  ".join(str(v) for v in failed))
            return 1
    if args.print_trtexec:
        _print(args, summary, "")
        return 0
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()] if args.graphs else None
    try:
        path = build_engines(bundle, config, out, graphs=graphs, overwrite=args.overwrite, progress=not args.json)
    except TensorRTUnavailableError as err:
        summary["error"] = str(err)
        _print(args, summary, "use the trtexec commands above, or install TensorRT:")
        print(f"coca-edge build-engine: {err}", file=sys.stderr)
        return 2
    summary["engines"] = json.loads((path / "engines.json").read_text())["graphs"]
    _print(args, summary, f"engines written to {path} (load with EdgeCoCa.load(bundle, engines='{path}'))")
    return 0


def _print(args: argparse.Namespace, summary: dict, message: str) -> None:
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    checks = summary.get("checks")
    if checks is not None and not any(checks.values()):
        print("structural checks passed (ops/dtypes vs the TensorRT support table, Q/DQ rules, profiles)")
    print("equivalent trtexec commands:")
    for graph, command in summary["trtexec"].items():
        print(f"  # {graph}\n  {command}")
    if message:
        print(message)
