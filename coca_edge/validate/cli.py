"""``coca-edge validate``: accuracy drift of candidates against a reference, with gates and reports.

Exit codes: 0 every gate passed (or no gates), 1 a gate failed, 2 usage or input error
(unreadable model, different architectures or tokenizers, empty data, bad gates file).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["register"]

_EXAMPLE = """example:
  coca-edge validate --reference recipes/demo_teacher/model.safetensors \\
      --candidate bundles/demo --candidate bundles/demo-int8 \\
      --data synthetic-scenes:val --samples 500 --gates cpu-int8 --localize 10 --out reports/demo

models: a bundle directory (ONNX Runtime) or a checkpoint (.safetensors, .pt/.bin, an open_clip
snapshot directory, a coca-edge checkpoint; PyTorch). CKPT@fp16 runs a checkpoint in real FP16
arithmetic with LayerNorm and the vocabulary head in FP32 (what an FP16 bundle computes);
CKPT@fp16-pure and CKPT@bf16 run every op in that dtype. Gates: a YAML file or a shipped name
(cpu-int8, gpu-fp16); metric names are listed in docs/validation.md.

on a GPU, the FP16 a GPU computes (reference and candidates run on CUDA, FP32 without TF32):
  coca-edge validate --device cuda --reference CKPT --candidate CKPT@fp16 --candidate CKPT@bf16 \\
      --gates gpu-fp16 --no-latency

Exit 0: all gates pass; 1: a gate failed; 2: usage or input error."""


def register(sub: argparse._SubParsersAction) -> None:
    from .data import DATA_HELP

    p = sub.add_parser("validate", help="compare model variants with a reference (tensors, tasks, gates, reports)",
                       description="Run a reference and candidates on the same data; report tensor drift per "
                                   "graph, task metrics and their deltas, captions that differ, and gate verdicts.",
                       epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="reference model (bundle or checkpoint), usually FP32")
    p.add_argument("--candidate", action="append", required=True, help="candidate model; repeat for several")
    p.add_argument("--label", action="append", help="name of a candidate in tables and plots; one per --candidate, "
                                                    "in the same order (default: the candidate's path)")
    p.add_argument("--data", default="synthetic-scenes:val", help=f"evaluation data: {DATA_HELP}")
    p.add_argument("--samples", type=int, default=500, help="samples per task (default 500)")
    p.add_argument("--gates", help="gates YAML file or shipped name (cpu-int8, gpu-fp16)")
    p.add_argument("--localize", type=int, default=0, metavar="K",
                   help="list the K FP32 nodes adding the most error (ONNX candidates, FP32 ONNX reference)")
    p.add_argument("--out", help="folder for report.json, report.md and report.html")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for the encoders (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="greedy caption length limit (default 20)")
    p.add_argument("--tensor-samples", type=int, default=16,
                   help="samples for the per-graph tensor comparison (default 16)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--different-architecture", action="store_true",
                   help="allow candidates of another architecture (a student vs its teacher): tasks and "
                        "captions are compared, tensors are not")
    p.add_argument("--device", default="cpu",
                   help="torch device for checkpoint models (cpu, cuda, cuda:N; default cpu): cuda measures a GPU's "
                        "own FP16 / BF16 arithmetic for CKPT@fp16 / @bf16. Bundles run on --providers")
    p.add_argument("--providers", help="comma-separated ONNX Runtime providers")
    p.add_argument("--threads", type=int, help="intra-op threads per ONNX Runtime session")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    p.set_defaults(func=_run)


def _input_errors() -> tuple[type[Exception], ...]:
    from ..data import DataError, ImageLoadError
    from ..models.openclip import CheckpointError
    from ..runtime import BundleError
    from ..tokenizer import TokenizerError
    from .gates import GateError
    from .localize import LocalizationError
    from .models import IncompatibleModelsError, ModelSpecError

    return (GateError, DataError, ImageLoadError, CheckpointError, BundleError, TokenizerError,
            IncompatibleModelsError, ModelSpecError, LocalizationError, FileNotFoundError)


def _run(args: argparse.Namespace) -> int:
    from .report import format_table, summary_rows, to_json
    from .validator import validate

    if args.samples < 1 or args.localize < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
        print("coca-edge validate: error: --samples, --batch-size and --max-new-tokens must be >= 1 and "
              "--localize >= 0", file=sys.stderr)
        return 2
    if args.label is not None and len(args.label) != len(args.candidate):
        print(f"coca-edge validate: error: {len(args.label)} --label for {len(args.candidate)} --candidate "
              "(give one per candidate, in order)", file=sys.stderr)
        return 2
    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    try:
        report = validate(args.reference, args.candidate, data=args.data, samples=args.samples, gates=args.gates,
                          localize=args.localize, out=args.out, latency=not args.no_latency,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          tensor_samples=args.tensor_samples, providers=providers, threads=args.threads,
                          different_architecture=args.different_architecture, labels=args.label,
                          device=args.device)
    except _input_errors() as err:
        print(f"coca-edge validate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(to_json(report))
    else:
        print(format_table(summary_rows(report)))
        for note in report.notes:
            print(f"note: {note}")
        for result in report.results:
            for gate in result.gate_results:
                if not gate.passed:
                    measured = "not evaluated" if gate.measured is None else f"{gate.measured:.6g}"
                    print(f"FAIL {result.spec}: {gate.name} measured {measured}, allowed {gate.op} {gate.allowed:g}"
                          + (f" ({gate.reason})" if gate.measured is None else ""))
            for drift in result.localization:
                print(f"  drift {result.spec}: {drift.graph}/{drift.node} ({drift.op_type}) -> {drift.output}: "
                      f"SQNR {drift.sqnr_db:.1f} dB, adds {drift.added_error_db:.1f} dB")
        if args.out:
            print(f"reports: {args.out}/report.html, report.md, report.json ({report.seconds:.0f} s)")
    return 0 if report.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coca-edge")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["validate", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
