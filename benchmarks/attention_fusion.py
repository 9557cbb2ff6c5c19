"""One decode step with and without ``fuse_attention`` (not a test): the ``cpu`` preset's INT8 and
INT4 decoders, each quantized twice from the same FP32 bundle, timed interleaved against FP32.

    python benchmarks/attention_fusion.py --bundle B32 --work DIR   # B32: a coca_ViT-B-32 bundle
    python benchmarks/attention_fusion.py --preset test-tiny --work /tmp/af --runs 3   # smoke test

Exports the preset with random weights when --bundle does not exist. Each variant is written
once under --work and reused. For every batch: one step at past --past from real greedy
prefixes (``benchmarks/quantize.py``'s feeds), medians of --runs interleaved runs, the
largest logits / cache difference of each fused graph against its unfused twin, and ratios
against the FP32 decoder. Writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from machine import describe, machine_info


def _variants(bundle: Path, work: Path) -> dict[str, Path]:
    from coca_edge.quantize import preset_plan, quantize

    out = {"FP32": bundle / "decoder.onnx"}
    for precision in ("int8", "int4"):
        fused = preset_plan("cpu", precision)
        unfused = {**fused, "decoder": _without_fusion(fused["decoder"])}
        for label, plan in ((f"{precision.upper()} unfused", unfused), (f"{precision.upper()} fused", fused)):
            target = work / label.lower().replace(" ", "-")
            if not (target / "manifest.json").exists():
                print(f"quantizing {label} -> {target}", flush=True)
                quantize(bundle, plan, target, progress=False)
            out[label] = target / "decoder.onnx"
    return out


def _without_fusion(cfg):
    from dataclasses import replace

    return replace(cfg, fuse_attention=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="coca_ViT-B-32")
    ap.add_argument("--bundle", help="FP32 bundle (exported here with random weights when missing)")
    ap.add_argument("--work", required=True, help="folder for the quantized variants (reused)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--past", type=int, default=15)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/attention_fusion.json")
    args = ap.parse_args()

    import onnxruntime as ort
    from quantize import _inputs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else work / "fp32"
    if not (bundle / "manifest.json").exists():
        import torch

        from coca_edge.exporters.bundle import export_bundle
        from coca_edge.models import CoCa, get_preset

        torch.manual_seed(0)
        export_bundle(CoCa(get_preset(args.preset)).eval(), bundle, progress=False)
    graphs = _variants(bundle, work)

    def session(path: Path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sessions = {k: session(v) for k, v in graphs.items()}
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        feed = _inputs(bundle, batch, args.past, args.threads)["decoder"]
        outs = {k: dict(zip([o.name for o in s.get_outputs()], s.run(None, feed))) for k, s in sessions.items()}
        diff = {}
        for precision in ("INT8", "INT4"):
            a, b = outs[f"{precision} fused"], outs[f"{precision} unfused"]
            diff[precision] = {"max_abs": max(float(np.abs(a[n] - b[n]).max()) for n in b),
                               "argmax_equal": float(np.mean(a["logits"].argmax(-1) == b["logits"].argmax(-1)))}
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(3):
            for s in sessions.values():
                s.run(None, feed)
        for _ in range(args.runs):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[batch] = {"median_ms": {k: v * 1e3 for k, v in med.items()},
                          "vs_fp32": {k: med["FP32"] / v for k, v in med.items()}, "fused_vs_unfused": diff}

    print(f"\none decode step at past {args.past}, {args.preset}, {args.threads} threads, medians of {args.runs} "
          f"interleaved runs; {describe(machine_info())}")
    for batch, r in results.items():
        print(f"batch {batch}: " + " | ".join(f"{k} {r['median_ms'][k]:.2f} ms ({r['vs_fp32'][k]:.2f}x FP32)"
                                               for k in r["median_ms"]))
        for precision in ("INT8", "INT4"):
            speedup = r["median_ms"][f"{precision} unfused"] / r["median_ms"][f"{precision} fused"]
            d = r["fused_vs_unfused"][precision]
            print(f"  {precision} fused vs unfused: {speedup:.2f}x; max |diff| {d['max_abs']:.2e}, "
                  f"argmax equal {d['argmax_equal']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"preset": args.preset, "past": args.past, "runs": args.runs,
                                           "threads": args.threads, "machine": machine_info(),
                                           "batches": results}, indent=2))


if __name__ == "__main__":
    main()
