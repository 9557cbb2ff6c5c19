"""Quantization variants per graph: bytes, CPU latency (b1/b8) and drift vs FP32.

Not a test: prints ratio tables (medians of interleaved runs, same weights, same inputs) and
writes JSON. Variants: FP32, FP16, INT8 dynamic, INT8 static QDQ per preset (cpu, arm64,
tensorrt) and INT4 weight-only (decoder and text encoder; the rest dynamic INT8), each made
with `coca_edge.quantize`. Inputs are real: synthetic-scenes images, their captions, the FP32
image tokens, and a decode step at past length --past with the FP32 greedy tokens.

    python benchmarks/quantize.py                                   # coca_ViT-B-32, random weights
    python benchmarks/quantize.py --bundle DIR                      # reuse an FP32 bundle
    python benchmarks/quantize.py --preset-model test-tiny --runs 2  # smoke test

Targets (issue #11, coca_ViT-B-32): INT8 image encoder >= 4x PyTorch FP32 eager at b1 with
cosine >= 0.999; decoder step >= 2.5x FP32 ORT at b1 and b8; INT8 bundle <= 0.3x FP32 bytes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import describe, machine_info

GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")


def _variants():
    from coca_edge.quantize import Fp16Config, Int8DynamicConfig, preset_plan

    return {
        "fp16": lambda: {g: Fp16Config() for g in GRAPHS},
        "int8-dynamic": lambda: {g: Int8DynamicConfig() for g in GRAPHS},
        "int8-static-cpu": lambda: preset_plan("cpu", "int8", "static"),
        "int8-static-arm64": lambda: preset_plan("arm64", "int8", "static"),
        "int8-static-tensorrt": lambda: preset_plan("tensorrt", "int8"),
        "int8-weight-only": lambda: preset_plan("cpu", "int8", "weight-only"),
        "int4-weight-only": lambda: preset_plan("cpu", "int4"),
    }


def _inputs(bundle: Path, batch: int, past: int, threads: int) -> dict[str, dict[str, np.ndarray]]:
    """One real feed per graph at ``batch``: scenes, captions, FP32 image tokens, a decode step."""
    from coca_edge.data import PreprocessConfig, SyntheticScenes, preprocess_batch
    from coca_edge.runtime import EdgeCoCa
    from coca_edge.runtime.generation import decoder_feed

    edge = EdgeCoCa.load(bundle, threads=threads, verify_hashes=False)
    ds = SyntheticScenes("val", image_size=edge.image_size)
    images, captions, _ = ds.batch(range(batch))
    pixels = preprocess_batch(list(images), PreprocessConfig.from_dict(edge.bundle.config["preprocess"]))
    tokens = edge.runners["image_encoder"].run({"pixel_values": pixels})["image_tokens"]
    cross = edge.cross_kv(pixels)
    # Prefill `past` greedy tokens with the FP32 decoder, then time one step after them.
    seqs = edge.caption_ids(pixels, max_new_tokens=past + 1, min_new_tokens=past + 1, batch_size=batch).sequences
    ids = np.array([[edge.layout.sot_token_id, *s[:past - 1]] for s in seqs], np.int64)
    out = edge.runners["decoder"].run(decoder_feed(ids, edge.layout.empty_past(batch), cross))
    step = decoder_feed(np.array([[s[past - 1]] for s in seqs], np.int64),
                        edge.layout.next_past(out), cross)
    return {"image_encoder": {"pixel_values": pixels},
            "text_encoder": {"input_ids": edge.tokenizer(captions, context_length=edge.layout.context_length)},
            "cross_kv": {"image_tokens": tokens},
            "decoder": {k: np.ascontiguousarray(v) for k, v in step.items()}}


def _drift(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, float]:
    worst = {"cosine_min": 1.0, "sqnr_db": float("inf")}
    for name, r in ref.items():
        a, b = r.reshape(r.shape[0], -1).astype(np.float64), out[name].reshape(r.shape[0], -1).astype(np.float64)
        if name.startswith("present_") or name == "cross_kv":  # batch is axis 2 of caches
            a = np.moveaxis(r, 2, 0).reshape(r.shape[2], -1).astype(np.float64)
            b = np.moveaxis(out[name], 2, 0).reshape(r.shape[2], -1).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        noise = ((a - b) ** 2).sum()
        sqnr = 10 * np.log10((a ** 2).sum() / noise) if noise > 0 else float("inf")
        worst = {"cosine_min": min(worst["cosine_min"], float(cos.min())), "sqnr_db": min(worst["sqnr_db"], sqnr)}
    return worst


def _torch_image_encoder_ms(preset: str, seed: int, pixels: np.ndarray, runs: int, threads: int) -> float:
    import torch

    from coca_edge.models import CoCa, get_preset

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = CoCa(get_preset(preset)).eval()
    x = torch.from_numpy(pixels)
    with torch.no_grad():
        model.encode_image(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model.encode_image(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset-model", default="coca_ViT-B-32", help="architecture preset (test-tiny to smoke-test)")
    ap.add_argument("--bundle", help="FP32 bundle of --preset-model/--seed (exported to a temp dir if absent)")
    ap.add_argument("--variants", default=",".join(_variants()), help="comma-separated variants (FP32 always runs)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--past", type=int, default=15, help="decode step measured after this many tokens")
    ap.add_argument("--runs", type=int, default=10, help="interleaved timing runs per graph, variant and batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--json", default="benchmarks/results/quantize.json")
    args = ap.parse_args()

    from coca_edge.calibration import CalibrationData
    from coca_edge.quantize import quantize
    from coca_edge.runtime.bundle import Bundle
    from coca_edge.runtime.runners import OrtRunner

    tmp = tempfile.TemporaryDirectory(prefix="coca-edge-bench-")
    bundle = Path(args.bundle) if args.bundle else Path(tmp.name) / "fp32"
    if not (bundle / "manifest.json").exists():
        import torch

        from coca_edge.exporters.bundle import export_bundle
        from coca_edge.models import CoCa, get_preset

        torch.manual_seed(args.seed)
        export_bundle(CoCa(get_preset(args.preset_model)).eval(), bundle,
                      source_model={"preset": args.preset_model, "weights": f"random(seed={args.seed})"})
    calib = CalibrationData("synthetic-scenes:train", samples=args.calib_samples)
    variants = {"fp32": bundle}
    factories = _variants()
    for name in [v for v in args.variants.split(",") if v and v != "fp32"]:
        t = time.perf_counter()
        variants[name] = quantize(bundle, factories[name](), Path(tmp.name) / name, calib, progress=True)
        print(f"quantized {name} in {time.perf_counter() - t:.0f} s", flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    feeds = {b: _inputs(bundle, b, args.past, args.threads) for b in batches}
    runners = {}
    for name, path in variants.items():
        b = Bundle.load(path, verify_hashes=False)
        fp16 = any(b.precision(g) == "fp16" for g in b.manifest["graphs"])
        runners[name] = {g: OrtRunner(b.graph_path(g), threads=args.threads,
                                      optimization="extended" if fp16 else "all", name=g)
                         for g in b.manifest["graphs"]}
    sizes = {name: {g: b.graph_bytes(g) for g in GRAPHS}
             for name, b in ((n, Bundle.load(p, verify_hashes=False)) for n, p in variants.items())}
    ref_out = {b: {g: runners["fp32"][g].run(feeds[b][g]) for g in GRAPHS} for b in batches}
    drift = {name: {g: _drift(ref_out[batches[-1]][g], r[g].run(feeds[batches[-1]][g])) for g in GRAPHS}
             for name, r in runners.items()}
    times: dict[str, dict[str, dict[int, list[float]]]] = {
        n: {g: {b: [] for b in batches} for g in GRAPHS} for n in variants}
    for b in batches:
        for name in variants:
            for g in GRAPHS:
                runners[name][g].run(feeds[b][g])  # warm-up
        for _ in range(args.runs):
            for g in GRAPHS:
                for name in variants:  # interleaved: machine noise hits every variant alike
                    t = time.perf_counter()
                    runners[name][g].run(feeds[b][g])
                    times[name][g][b].append(time.perf_counter() - t)
    med = {n: {g: {b: statistics.median(v) * 1e3 for b, v in bs.items()} for g, bs in gs.items()}
           for n, gs in times.items()}
    torch_ms = _torch_image_encoder_ms(args.preset_model, args.seed, feeds[batches[0]]["image_encoder"]["pixel_values"],
                                       args.runs, args.threads)

    print(f"\n{describe(machine_info())}")
    print(f"{args.preset_model}, {args.threads} threads, medians of {args.runs} interleaved runs; "
          f"decoder = one step at past {args.past}; drift on batch {batches[-1]} vs FP32")
    head = f"{'variant':<22}{'graph':<15}{'MB':>8}{'x FP32':>8}" + "".join(
        f"{'b' + str(b) + ' ms':>10}{'speedup':>9}" for b in batches) + f"{'cos min':>10}{'SQNR dB':>9}"
    print(head)
    print("-" * len(head))
    for name in variants:
        for g in GRAPHS:
            row = f"{name:<22}{g:<15}{sizes[name][g] / 1e6:>8.1f}{sizes[name][g] / sizes['fp32'][g]:>8.2f}"
            for b in batches:
                row += f"{med[name][g][b]:>10.2f}{med['fp32'][g][b] / med[name][g][b]:>8.2f}x"
            print(row + f"{drift[name][g]['cosine_min']:>10.5f}{drift[name][g]['sqnr_db']:>9.1f}")
    print()
    for name in variants:
        total = sum(sizes[name].values()) / sum(sizes["fp32"].values())
        print(f"{name:<22} bundle graphs {sum(sizes[name].values()) / 1e6:8.1f} MB = {total:.2f}x FP32")
    b0 = batches[0]
    print(f"\nPyTorch FP32 eager image encoder, batch {b0}: {torch_ms:.1f} ms")
    for name in variants:
        print(f"{name} image encoder vs PyTorch FP32 eager, batch {b0}: {torch_ms / med[name]['image_encoder'][b0]:.1f}x"
              f" (cosine min {drift[name]['image_encoder']['cosine_min']:.5f})")
    for name in variants:
        print(f"{name} decoder step vs FP32 ORT: " + ", ".join(
            f"batch {b} {med['fp32']['decoder'][b] / med[name]['decoder'][b]:.2f}x" for b in batches))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "preset_model": args.preset_model, "threads": args.threads, "runs": args.runs, "past": args.past,
        "machine": machine_info(),
        "bytes": sizes, "median_ms": med, "drift_vs_fp32": drift, "all_s": times,
        "torch_fp32_image_encoder_ms": torch_ms}, indent=2, default=str))
    print(f"wrote {args.json}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
