"""Data-loading throughput on this machine: can one core feed training?

    PYTHONPATH=. python benchmarks/data_speed.py [--n 2000] [--repeats 3] [--json out.json]

Measures, single process (one core), medians of --repeats runs:
  - synthetic-scenes generation (render + caption) at 64 px and 32 px, and with
    normalisation to float32 [N, 3, H, W] (what a training step consumes);
  - the webdataset reader with preprocessing, on synthetic-scenes shards written to a
    temporary folder (64 px PNG; and 256x320 JPEG photos-like images to 224 px, the
    coca_ViT-B-32 teacher's input);
  - preprocessing alone vs open_clip's torchvision transform on the same decoded images
    (the peer; skipped if open_clip is not installed).
Ratios are against what training needs: the demo models train at ~3.5 steps/s (2.5M
params) to ~12 steps/s (0.42M params) at batch 64 on 2 cores (docs/data.md, FACTS), so
up to ~770 samples/s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from PIL import Image

from coca_edge.data import (
    PreprocessConfig,
    Preprocessor,
    SceneConfig,
    SyntheticScenes,
    WebDatasetReader,
    preprocess,
    preprocess_batch,
    write_synthetic,
)

NEEDED = 12 * 64  # samples/s for the fastest demo model (0.42M params, ~12 steps/s, batch 64)


def _median_rate(fn, n: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def _write_photo_shards(folder: str, n: int, per_shard: int) -> list[str]:
    """JPEG shards of 256x320 synthetic scenes (upscaled, so they decode like photos)."""
    import tarfile

    ds = SyntheticScenes("train", config=SceneConfig(image_size=128), length=n)
    paths = []
    for start in range(0, n, per_shard):
        path = os.path.join(folder, f"photo-{start // per_shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(ds.pixels(i)).resize((320, 256), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", ds.caption(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="samples per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    n, repeats = args.n, args.repeats
    rows: list[tuple[str, float, float | None]] = []  # (what, samples/s, peer samples/s)

    for size in (64, 32):
        ds = SyntheticScenes("train", image_size=size)
        cfg = PreprocessConfig(image_size=size)
        ds.batch(range(200))  # warm the shape-mask cache
        rows.append((f"synthetic {size}px: render + caption", _median_rate(lambda: ds.batch(range(n)), n, repeats), None))
        rows.append((
            f"synthetic {size}px: + normalise to float32",
            _median_rate(lambda: preprocess_batch(ds.batch(range(n))[0], cfg), n, repeats),
            None,
        ))

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_synthetic(tmp, "train", n, fmt="wds", shard_size=max(1, n // 4))
        cfg64 = PreprocessConfig(image_size=64)
        reader = WebDatasetReader(shards, transform=Preprocessor(cfg64))
        rows.append(("webdataset 64px PNG -> preprocess 64", _median_rate(lambda: sum(1 for _ in reader), n, repeats), None))
        photo_n = max(50, n // 4)
        photo_shards = _write_photo_shards(tmp, photo_n, max(1, photo_n // 2))
        cfg224 = PreprocessConfig(image_size=224)
        reader = WebDatasetReader(photo_shards, transform=Preprocessor(cfg224))
        rows.append((
            "webdataset 320x256 JPEG -> preprocess 224",
            _median_rate(lambda: sum(1 for _ in reader), photo_n, repeats),
            None,
        ))

        raw = [sample.image for _, sample in zip(range(photo_n), WebDatasetReader(photo_shards))]
        try:
            import open_clip
            import torch

            torch.set_num_threads(1)
            peer = open_clip.image_transform(224, is_train=False)
            peer_rate = _median_rate(lambda: [peer(img) for img in raw], len(raw), repeats)
        except ImportError:
            peer_rate = None
        rows.append((
            "preprocess only, decoded 320x256 -> 224",
            _median_rate(lambda: [preprocess(img, cfg224) for img in raw], len(raw), repeats),
            peer_rate,
        ))

    print(f"# data_speed: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {sys.version.split()[0]}, one process, median of {repeats}")
    print(f"# needed: ~{NEEDED} samples/s (0.42M demo model, ~12 steps/s x batch 64 on 2 cores)")
    print(f"{'what':44s} {'samples/s':>10s} {'x needed':>9s} {'open_clip':>10s} {'x peer':>7s}")
    for what, rate, peer in rows:
        peer_text = f"{peer:10.0f} {rate / peer:7.2f}" if peer else f"{'-':>10s} {'-':>7s}"
        print(f"{what:44s} {rate:10.0f} {rate / NEEDED:9.2f} {peer_text}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"needed_samples_per_s": NEEDED, "n": n, "repeats": repeats,
                       "results": [{"what": w, "samples_per_s": r, "open_clip_samples_per_s": p} for w, r, p in rows]},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
