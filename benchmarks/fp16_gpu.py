"""Real FP16 / BF16 arithmetic on a GPU against FP32 on the CPU, on trained checkpoints (not a test):
what the ``gpu-fp16`` preset and gates promise, measured where FP16 is native.

    python benchmarks/fp16_gpu.py --model teacher=recipes/demo_teacher/model.safetensors \\
        --model student=runs/demo/student/out/model.safetensors --samples 500 --json fp16_gpu.json
    python benchmarks/fp16_gpu.py --model tiny=CKPT --samples 8 --device cpu     # smoke test, no GPU

Each checkpoint's reference is itself in FP32 on the CPU, the reference every other measurement
in this project uses. Candidates, on the same ``synthetic-scenes:val`` samples through
``coca_edge.validate.Validator``: FP32 on ``--device`` (TF32 off: summation order only), ``@fp16``
(LayerNorm and the vocabulary head in FP32, what FP16 bundles keep), ``@fp16-pure`` and ``@bf16``
on ``--device``, and ``@fp16`` on the CPU (what docs/quantization.md measured before a GPU was
at hand), each with the ``gpu-fp16`` gates. Prints a table; writes JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import time

from machine import describe, machine_info

_METRICS = ("caption_exact_match", "caption_token_agreement", "decoder.logits.top1_agreement", "embed_cosine_min",
            "zero_shot_top1_drop", "retrieval_R@1_drop", "hallucination_rate_increase")
_SHORT = ("captions =", "tokens =", "logits top1", "cos min", "zs drop", "R@1 drop", "halluc +")


def _candidates(device: str) -> list[tuple[str, str, str]]:
    """(label, dtype suffix, torch device) per candidate."""
    rows = [(f"FP32 {device}", "", device), (f"@fp16 {device}", "@fp16", device),
            (f"@fp16-pure {device}", "@fp16-pure", device), (f"@bf16 {device}", "@bf16", device)]
    if device != "cpu":
        rows.append(("@fp16 cpu", "@fp16", "cpu"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=CKPT",
                    help="a checkpoint to measure (repeat for several)")
    ap.add_argument("--device", default="cuda", help="torch device of the candidates (default cuda)")
    ap.add_argument("--samples", type=int, default=500, help="samples per task (default 500)")
    ap.add_argument("--data", default="synthetic-scenes:val")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    models = dict(m.split("=", 1) for m in args.model)

    from coca_edge.validate import Validator, load_gates, open_model
    from coca_edge.validate.models import describe_device

    gates = load_gates("gpu-fp16")
    info = machine_info()
    result = {"machine": info, "device": describe_device(args.device), "samples": args.samples, "data": args.data,
              "gates": "gpu-fp16", "models": {}}
    print(f"# {describe(info)}; candidates on {result['device']}; reference FP32 on the CPU; "
          f"{args.samples} {args.data} samples per task")
    header = f"{'model':<10} {'candidate':<18} " + " ".join(f"{s:>11}" for s in _SHORT) + f" {'gpu-fp16':>9} {'s':>6}"
    print(header)
    for name, path in models.items():
        start = time.perf_counter()
        validator = Validator(open_model(path, device="cpu"), data=args.data, samples=args.samples, progress=False)
        rows = {"reference_seconds": round(time.perf_counter() - start, 1)}
        for label, suffix, device in _candidates(args.device):
            start = time.perf_counter()
            cand = validator.evaluate(open_model(f"{path}{suffix}", device=device), latency=False)
            verdicts = gates.evaluate(cand.metrics)
            row = {k: cand.metrics.get(k) for k in _METRICS}
            row["gates_failed"] = [g.name for g in verdicts if not g.passed]
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows[label] = row
            cells = " ".join(f"{row[k]:>11.4f}" if isinstance(row[k], float) else f"{str(row[k]):>11}"
                             for k in _METRICS)
            verdict = "PASS" if not row["gates_failed"] else f"FAIL {len(row['gates_failed'])}"
            print(f"{name:<10} {label:<18} {cells} {verdict:>9} {row['seconds']:>6.1f}", flush=True)
        result["models"][name] = {"checkpoint": path, **rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
