"""Distillation throughput: teacher-output cache vs the live teacher (target >= 2x).

    python benchmarks/distill_speed.py [--teacher CKPT] [--steps 40] [--repeats 3] [--threads 2]

Same student (demo-student), same batches, all three KD terms on; the only difference is
where the teacher's outputs come from. Prints a ratio table (medians over repeats) and
writes benchmarks/results/distill_speed.json. The one-time cache build is reported apart.
Without --teacher, a randomly initialised demo-teacher is used (speed does not depend on
the weights), with the head columns of unused tokens zeroed as training it leaves them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _rate(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # first window has warm-up
    return statistics.median(rates)


def main(argv=None) -> int:
    import torch
    from safetensors.torch import save_file

    from coca_edge.distill.config import DataConfig, TrainConfig
    from coca_edge.distill.data import open_train_data
    from coca_edge.distill.trainer import data_vocabulary, train
    from coca_edge.tokenizer import Tokenizer
    from coca_edge.models import CoCa, get_preset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="teacher checkpoint (default: random demo-teacher)")
    p.add_argument("--student", default="demo-student")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/distill_speed.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="distill-speed-"))
    teacher = args.teacher
    if teacher is None:
        torch.manual_seed(0)
        model = CoCa(get_preset("demo-teacher"))
        # as trained by recipes/demo_teacher.yaml (caption_vocab: data): unused head columns are zero
        data = open_train_data(DataConfig(), model.config)
        used = data_vocabulary(data, Tokenizer(), model.config, 32, scan=5000)
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[used] = True
        with torch.no_grad():
            model.decoder.head[:, ~keep] = 0
        (work / "teacher").mkdir()
        save_file(model.state_dict(), str(work / "teacher" / "model.safetensors"))
        (work / "teacher" / "config.json").write_text(model.config.to_json())
        teacher = str(work / "teacher" / "model.safetensors")
    train_size = args.steps * args.batch_size  # one epoch: every batch is new, as in real training

    def cfg(name: str, use_cache: bool) -> TrainConfig:
        return TrainConfig.from_dict({
            "model": args.student, "init": "scratch", "output_dir": str(work / name), "steps": args.steps,
            "batch_size": args.batch_size, "threads": args.threads, "log_every": max(1, args.steps // 8),
            "save_every": 10 ** 9, "data": {"train_size": train_size},
            "loss": {"affinity": 1.0, "feature": 1.0, "caption_kd": 1.0, "caption_vocab": "data"},
            "teacher": {"path": teacher, "use_cache": use_cache, "cache_dir": str(work / "cache")},
            "eval": {"at_end": False}})

    t0 = time.time()
    train(cfg("warm-cache", True), progress=False)  # builds the cache (one time, reported apart)
    build_s = time.time() - t0
    results = {"cached": [], "live": []}
    for r in range(args.repeats):
        for mode, use_cache in (("cached", True), ("live", False)):
            name = f"{mode}-{r}"
            train(cfg(name, use_cache), progress=False)
            results[mode].append(_rate(work / name))
    cached, live = statistics.median(results["cached"]), statistics.median(results["live"])
    table = {"student": args.student, "teacher": teacher, "batch_size": args.batch_size, "steps": args.steps,
             "threads": args.threads, "cached_samples_per_s": cached, "live_samples_per_s": live,
             "ratio": cached / live, "runs": results, "first_run_with_cache_build_s": round(build_s, 1)}
    print(f"{'mode':<14}{'samples/s (median)':>20}")
    print(f"{'live teacher':<14}{live:>20.1f}")
    print(f"{'cached':<14}{cached:>20.1f}")
    print(f"cache / live: {cached / live:.2f}x  (first run incl. cache build of {train_size} samples: {build_s:.0f} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
