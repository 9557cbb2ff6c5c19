"""Captioning speed: open_clip generate vs coca-edge PyTorch (KV cache) vs coca-edge ORT FP32, INT8 and
INT4-weight-only-decoder bundles (KV cache).

Not a test: prints a ratio table (medians of interleaved runs, same weights, same run) and
writes JSON. The same coca_ViT-B-32 weights (random, every parameter initialised) feed all
three; exactly --tokens new tokens are forced (the end token is suppressed until then).

    python benchmarks/caption_speed.py                   # exports a bundle to a temp dir first
    python benchmarks/caption_speed.py --bundle DIR      # reuse a bundle exported from --seed
    python benchmarks/caption_speed.py --preset test-tiny --runs 1 --batches 1   # smoke test

The INT8 bundle is `coca-edge quantize --precision int8 --preset cpu` (dynamic by default,
--int8-method static for QDQ), the INT4 one `--precision int4 --preset cpu` (weight-only
MatMulNBits decoder and text encoder); both are written beside --bundle (DIR-int8, DIR-int4)
and reused when present.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe, machine_info


def _seconds(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _copy_bandwidth(nbytes: int = 512 * 1024**2, runs: int = 5) -> float:
    """Memory traffic of a large copy (bytes read + bytes written) per second."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def _weight_bytes_per_step(decoder_path: Path) -> tuple[int, int]:
    """Bytes of decoder weights a single-token step reads (the token-embedding table is gathered, not streamed)."""
    import onnx

    model = onnx.load(str(decoder_path), load_external_data=True)
    total = skipped = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) * 4
        total += n
        if len(init.dims) == 2 and init.dims[0] >= 1000 and "embedding" in init.name:
            skipped += n
    return total - skipped, total


def _phases(runtime, pixels: np.ndarray, n: int, batch: int, runs: int = 3) -> dict[str, float]:
    """Where one caption's time goes (ms, the run of median total): each graph's ``run`` calls, and
    the host's share (the generation loop in numpy, feeds, argmax) as the rest."""
    spent: dict[str, float] = {}
    hooked = {name: runtime.runners[name] for name in ("image_encoder", "cross_kv", "decoder")}

    def timed(name, run):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return run(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for name, runner in hooked.items():
        runner.run = timed(name, runner.run)  # an instance attribute shadowing the method
    try:
        rows = []
        for _ in range(runs):
            spent.clear()
            total = _seconds(lambda: runtime.caption_ids(pixels, max_new_tokens=n, min_new_tokens=n,
                                                         batch_size=batch))
            rows.append({"total": total, **spent, "host": total - sum(spent.values())})
    finally:
        for runner in hooked.values():
            del runner.run
    row = sorted(rows, key=lambda r: r["total"])[len(rows) // 2]
    return {k: v * 1e3 for k, v in row.items()}


def _quantized(bundle: Path, precision: str, method: str | None, samples: int) -> Path:
    """The cpu-preset bundle of ``precision`` beside ``bundle`` (made once, then reused)."""
    from coca_edge.calibration import CalibrationData
    from coca_edge.quantize import preset_plan, quantize

    out = Path(f"{bundle}-{precision}{'-' + method if method else ''}")
    if not (out / "manifest.json").exists():
        quantize(bundle, preset_plan("cpu", precision, method), out,
                 CalibrationData("synthetic-scenes:train", samples=samples))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="coca_ViT-B-32")
    ap.add_argument("--bundle", help="bundle directory: reused if it exists (it must come from the same preset "
                                     "and --seed), else exported there")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=5, help="interleaved runs per implementation and batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8-method", choices=("dynamic", "static", "weight-only"), default=None,
                    help="INT8 method of the cpu preset (default: the preset's choice)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration images for static INT8")
    ap.add_argument("--no-quantized", action="store_true", help="FP32 rows only")
    ap.add_argument("--json", default="benchmarks/results/caption_speed.json")
    args = ap.parse_args()

    import open_clip

    from coca_edge.exporters.bundle import export_bundle
    from coca_edge.models import CoCa, get_preset
    from coca_edge.models.generate import greedy_generate
    from coca_edge.models.openclip import config_to_open_clip, to_open_clip
    from coca_edge.runtime import EdgeCoCa
    from coca_edge.runtime.generation import decoder_feed

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = get_preset(args.preset)
    model = CoCa(config).eval()  # every parameter initialised (CoCa.init_parameters)
    oc_cfg = dict(config_to_open_clip(config)["model_cfg"])
    oc_cfg.pop("custom_text")
    oc = open_clip.CoCa(**oc_cfg).eval()
    oc.load_state_dict(to_open_clip(model.state_dict(), config))  # includes text_decoder.text_projection

    tmp = None
    bundle = args.bundle
    if bundle is None:
        tmp = tempfile.TemporaryDirectory()
        bundle = Path(tmp.name) / "bundle"
    if not Path(bundle).exists():
        export_bundle(model, bundle, source_model={"preset": args.preset, "weights": f"random(seed={args.seed})"})
    runtime = EdgeCoCa.load(bundle, threads=args.threads, verify_hashes=False)
    quantized = {} if args.no_quantized else {
        "coca-edge ORT INT8 (KV cache)": _quantized(bundle, "int8", args.int8_method, args.calib_samples),
        "coca-edge ORT INT4-wo decoder (KV cache)": _quantized(bundle, "int4", None, args.calib_samples),
    }
    quantized = {k: EdgeCoCa.load(v, threads=args.threads, verify_hashes=False) for k, v in quantized.items()}

    n = args.tokens
    size = config.vision.image_size
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).clamp(-2, 2)
        px = pixels.numpy()
        impls = {
            # open_clip: end token suppressed until seq_len - 1, forced at seq_len: n new tokens
            "open_clip generate": lambda: oc.generate(pixels, generation_type="top_k", top_k=1, seq_len=n + 1,
                                                      min_seq_len=n),
            "coca-edge PyTorch (KV cache)": lambda: greedy_generate(model, pixels, max_new_tokens=n,
                                                                     min_new_tokens=n),
            "coca-edge ORT FP32 (KV cache)": lambda: runtime.caption_ids(px, max_new_tokens=n, min_new_tokens=n,
                                                                         batch_size=batch),
        }
        for name, qrt in quantized.items():
            impls[name] = lambda qrt=qrt: qrt.caption_ids(px, max_new_tokens=n, min_new_tokens=n, batch_size=batch)
        # check the three agree on the forced-length greedy tokens before timing them
        with torch.no_grad():
            ref = greedy_generate(model, pixels, max_new_tokens=n, min_new_tokens=n)[:, 1:]
            ocout = oc.generate(pixels, generation_type="top_k", top_k=1, seq_len=n + 1, min_seq_len=n)[:, 1:]
        ortout = np.array(runtime.caption_ids(px, max_new_tokens=n, min_new_tokens=n, batch_size=batch).sequences)
        agree = bool((ref[:, : n - 1] == ocout[:, : n - 1]).all()) and bool((ref.numpy() == ortout).all())
        times: dict[str, list[float]] = {k: [] for k in impls}
        with torch.no_grad():
            for fn in impls.values():
                fn()  # warm-up
            for _ in range(args.runs):
                for name, fn in impls.items():
                    times[name].append(_seconds(fn))
                    print(f"  batch {batch} {name}: {times[name][-1]:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        same = {name: float(np.mean(np.array(qrt.caption_ids(px, max_new_tokens=n, min_new_tokens=n,
                                                             batch_size=batch).sequences) == ortout))
                for name, qrt in quantized.items()}
        ort = {"coca-edge ORT FP32 (KV cache)": runtime, **quantized}
        phases = {name: _phases(rt, px, n, batch) for name, rt in ort.items()}
        results[batch] = {"median_s": med, "tokens_per_s": {k: batch * n / v for k, v in med.items()},
                          "all_s": times, "tokens_agree": agree, "quantized_token_agreement_vs_fp32": same,
                          "phases_ms": phases}

    # decode-step time vs the memory-bandwidth bound, batch 1, past of 15 tokens
    layout = runtime.layout
    decoder = runtime.runners["decoder"]
    cross = runtime.cross_kv(np.zeros((1, 3, size, size), np.float32))
    past = layout.empty_past(1)
    out = decoder.run(decoder_feed(np.full((1, 15), 320, np.int64), past, cross))
    feed = decoder_feed(np.full((1, 1), 320, np.int64), layout.next_past(out), cross)
    for _ in range(3):
        decoder.run(feed)
    step = statistics.median(_seconds(lambda: decoder.run(feed)) for _ in range(30))
    streamed, total = _weight_bytes_per_step(Path(bundle) / "decoder.onnx")
    bandwidth = _copy_bandwidth()
    bound = streamed / bandwidth

    machine = machine_info()
    print(f"\ncaptioning, {args.preset}, {n} new tokens forced, {args.threads} threads, "
          f"median of {args.runs} interleaved runs; {describe(machine)}")
    print(f"{'implementation':<42}" + "".join(f"{'batch ' + str(b) + ' tok/s':>18}" for b in results))
    for name in next(iter(results.values()))["median_s"]:
        print(f"{name:<42}" + "".join(f"{results[b]['tokens_per_s'][name]:>18.1f}" for b in results))
    for b, r in results.items():
        ratio = r["median_s"]["open_clip generate"] / r["median_s"]["coca-edge ORT FP32 (KV cache)"]
        ratio_pt = r["median_s"]["open_clip generate"] / r["median_s"]["coca-edge PyTorch (KV cache)"]
        print(f"ORT FP32 vs open_clip generate, batch {b}: {ratio:.1f}x   "
              f"(PyTorch KV cache vs open_clip: {ratio_pt:.1f}x; tokens agree: {r['tokens_agree']})")
        for name, label in (("coca-edge ORT INT8 (KV cache)", "INT8"),
                            ("coca-edge ORT INT4-wo decoder (KV cache)", "INT4-wo decoder")):
            if name in r["median_s"]:
                q = r["median_s"]["open_clip generate"] / r["median_s"][name]
                print(f"{label} vs open_clip generate, batch {b}: {q:.1f}x   (tokens equal to FP32 ORT: "
                      f"{r['quantized_token_agreement_vs_fp32'][name]:.1%}; random weights, see docs/quantization.md)")
    print(f"where a caption's time goes (ms; the run of median total of 3; host = the numpy generation "
          f"loop, feeds and argmax):")
    for b, r in results.items():
        for name, ph in r["phases_ms"].items():
            print(f"  batch {b} {name.removeprefix('coca-edge ').removesuffix(' (KV cache)'):<26} "
                  f"total {ph['total']:7.1f} | image_encoder {ph['image_encoder']:6.1f} | cross_kv "
                  f"{ph['cross_kv']:5.1f} | decoder {ph['decoder']:6.1f} ({ph['decoder'] / n:.1f} / step) | "
                  f"host {ph['host']:5.1f}")
    print(f"decode step (batch 1, past 15): {step * 1e3:.1f} ms; weights streamed per step "
          f"{streamed / 1e6:.0f} MB (of {total / 1e6:.0f} MB; the token-embedding table is gathered); "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound {bound * 1e3:.1f} ms; "
          f"step / bound = {step / bound:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"preset": args.preset, "tokens": n, "threads": args.threads,
                                           "machine": machine,
                                           "batches": results, "decode_step_s": step,
                                           "weights_streamed_bytes": streamed, "copy_bandwidth_Bps": bandwidth,
                                           "bound_s": bound}, indent=2, default=str))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
