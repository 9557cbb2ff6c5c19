"""Per-layer vs stacked KV-cache I/O of the decode step (not a test).

    python benchmarks/cache_layout.py                  # coca_ViT-B-32, random weights
    python benchmarks/cache_layout.py --work DIR       # keep / reuse the bundles in DIR

``coca-edge export`` writes the decoder with one cache tensor per layer and K / V
(``past_text_k_0 [B, H, past, D]`` ... in, ``present_*`` out). Bundles exported before took each
tower's cache stacked (``past_text [L, 2, B, H, past, D]``): inside the graph every layer's K
and V were cut out of it (ORT: ``Gather`` / ``Split`` / ``Squeeze`` copies) and after the
``Concat(past, new)`` stacked back (``Unsqueeze`` + ``Concat`` copy the whole cache again);
an ORT profile of that INT8 step at batch 8 spent ~21% of its kernel time there. This exports
the same weights both ways (``export_bundle(cache_layout=...)``), FP32 and INT8 (``cpu``
preset), checks that logits and caches are identical, and times one step, medians of
interleaved runs, same feeds; then captions 30 forced tokens with each bundle (medians of
``--caption-runs`` interleaved runs). Results go to ``benchmarks/results/cache_layout.json``.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, machine_info  # noqa: E402
from step_bench import fp32_and_int8_bundles, step_args  # noqa: E402
from quantize import _inputs  # noqa: E402  (same real feeds as benchmarks/quantize.py)


def caption_times(bundles: dict[str, Path], args) -> dict:
    """Whole captioning, 30 forced new tokens, per bundle: tokens/s and per-layer vs stacked."""
    from coca_edge.data import SyntheticScenes
    from coca_edge.runtime import EdgeCoCa

    edges = {n: EdgeCoCa.load(b, threads=args.threads, verify_hashes=False) for n, b in bundles.items()}
    out = {}
    for b in (int(x) for x in args.batches.split(",")):
        images = list(SyntheticScenes("val").batch(range(b))[0])
        run = {n: (lambda e=e: e.caption_ids(images, max_new_tokens=30, min_new_tokens=30, batch_size=b))
               for n, e in edges.items()}
        tokens = {n: f().sequences for n, f in run.items()}  # warm-up
        times = {n: [] for n in run}
        for _ in range(args.caption_runs):
            for n, f in run.items():
                t = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"\ncaptioning, batch {b}, 30 forced tokens, medians of {args.caption_runs} interleaved runs")
        for n, v in med.items():
            print(f"  {n:<20}{b * 30 / v:8.1f} tok/s")
        for p in ("FP32", "INT8"):
            same = tokens[f"{p} per-layer"] == tokens[f"{p} stacked"]
            print(f"  {p}: per-layer vs stacked {med[p + ' stacked'] / med[p + ' per-layer']:.2f}x, tokens identical: {same}")
        out[str(b)] = {"median_s": med, "all_s": times}
    return out


def main() -> None:
    args = step_args(__doc__, "benchmarks/results/cache_layout.json")

    from coca_edge.runtime import EdgeCoCa
    from coca_edge.runtime.generation import fit_cache_feed

    tmp = tempfile.TemporaryDirectory(prefix="coca-edge-cache-")
    work = Path(args.work or tmp.name)
    bundles = {}
    for layout in ("per-layer", "stacked"):
        fp32, int8 = fp32_and_int8_bundles(args.preset_model, work, cache_layout=layout)
        bundles[f"FP32 {layout}"], bundles[f"INT8 {layout}"] = fp32, int8

    machine = machine_info()
    print(describe(machine))
    results = {"preset_model": args.preset_model, "past": args.past, "threads": args.threads, "machine": machine,
               "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        feed = _inputs(bundles["FP32 per-layer"], b, args.past, args.threads)["decoder"]
        runners, feeds, outs = {}, {}, {}
        for name, bundle in bundles.items():
            edge = EdgeCoCa.load(bundle, threads=args.threads, verify_hashes=False)
            runners[name] = edge.runners["decoder"]
            feeds[name] = fit_cache_feed(feed, runners[name].input_names)
            out = runners[name].run(feeds[name])
            outs[name] = (out["logits"], *edge.layout.stack_past(edge.layout.next_past(out)))
        diffs = {p: max(float(np.abs(a - c).max()) for a, c in zip(outs[f"{p} per-layer"], outs[f"{p} stacked"]))
                 for p in ("FP32", "INT8")}
        times = {n: [] for n in runners}
        for _ in range(args.runs):
            for n, r in runners.items():  # interleaved: machine noise hits every variant alike
                t = time.perf_counter()
                r.run(feeds[n])
                times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        base = med["FP32 stacked"]
        print(f"\nbatch {b}, one step at past {args.past}, medians of {args.runs} interleaved runs")
        for n, v in med.items():
            print(f"  {n:<20}{v:8.2f} ms  {base / v:5.2f}x FP32 stacked")
        for p in ("FP32", "INT8"):
            print(f"  {p}: per-layer vs stacked {med[p + ' stacked'] / med[p + ' per-layer']:.2f}x, "
                  f"logits + caches max |diff| {diffs[p]:.1e}")
        print(f"  INT8 vs FP32, per-layer: {med['FP32 per-layer'] / med['INT8 per-layer']:.2f}x")
        results["batches"][str(b)] = {"median_ms": med, "max_abs_diff": diffs}
    results["captioning"] = caption_times(bundles, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
