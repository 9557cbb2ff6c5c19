"""``coca-edge train`` and ``coca-edge distill`` subcommands.

``coca_edge.cli`` calls :func:`register`; ``python -m coca_edge.distill.cli`` runs them
directly (what ``torchrun -m coca_edge.distill.cli ...`` uses to scale out).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["register", "main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML recipe (optional: defaults plus --set/flags)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set steps=200 --set loss.caption_kd=1 (repeatable)")
    p.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and final/ go (config: output_dir)")
    p.add_argument("--steps", type=int, help="optimiser steps (config: steps)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from <output_dir>/checkpoints/latest, or from the given checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train or fine-tune a CoCa model (contrastive + captioning)",
        description="CoCa training / fine-tuning: loss = w_con * contrastive + w_cap * caption. "
                    "Runs under torchrun for DDP.",
        epilog='examples:\n  coca-edge train recipes/demo_teacher.yaml\n  coca-edge train recipes/demo_teacher.yaml --resume            # continue where it stopped\n  coca-edge train --model coca_ViT-B-32 --init ~/hub/coca-b32 --set data.dataset=my.tsv --output-dir runs/ft', formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(train)
    train.add_argument("--model", help="architecture preset or config.json (config: model)")
    train.add_argument("--init", help="'scratch' or a checkpoint to fine-tune (config: init)")
    train.set_defaults(func=_run, mode="train")
    distill = subparsers.add_parser(
        "distill", help="distill a teacher into a smaller student",
        description="Teacher -> student distillation: ground-truth losses plus affinity, feature and "
                    "caption KD (on ground-truth captions: loss.caption_kd; on captions the teacher generates: "
                    "loss.caption_seq_kd, optionally without hallucinated teacher captions: "
                    "teacher.filter_hallucinated) and decoder-state KD (loss.decoder_feature) from cached teacher "
                    "outputs; hard-negative captions for attribute binding: loss.hard_negative.",
        epilog='examples:\n  coca-edge distill recipes/demo_distill.yaml\n  coca-edge distill --teacher runs/ft/final/model.safetensors --student coca_ViT-Ti-32 --steps 20000\n  torchrun --nproc_per_node 2 -m coca_edge.distill.cli distill recipes/demo_distill.yaml   # DDP', formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(distill)
    distill.add_argument("--teacher", help="teacher checkpoint (config: teacher.path)")
    distill.add_argument("--student", help="student architecture preset or config.json (config: model)")
    distill.add_argument("--init", help="'inherit' (from the teacher), 'scratch' or a checkpoint (config: init)")
    distill.set_defaults(func=_run, mode="distill")
    prune = subparsers.add_parser(
        "prune-vocab", help="drop the vocabulary rows a checkpoint's data never uses",
        description="Vocabulary pruning: keep the token-embedding rows and decoder-head columns of the tokens "
                    "in the training captions (plus start/end/pad). Token ids, the tokenizer and every graph "
                    "interface stay the same; the model can no longer predict other tokens. On the demo "
                    "teacher this removes 83%% of its parameters. Training can prune from the start instead "
                    "(recipe key vocab: data).",
        epilog="examples:\n  coca-edge prune-vocab recipes/demo_teacher/model.safetensors --out runs/teacher-pruned\n"
               "  coca-edge prune-vocab ~/ckpt/student --data my-captions.csv --out runs/student-pruned",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("checkpoint", help="coca-edge checkpoint (model.safetensors + config.json) or open_clip one")
    prune.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    prune.add_argument("--data", default="synthetic-scenes",
                       help="captions whose tokens are kept: synthetic-scenes or an open_clip CSV/TSV "
                            "(default: synthetic-scenes)")
    prune.add_argument("--samples", type=int, default=50_000, help="captions scanned (default 50000)")
    prune.add_argument("--max-text-len", type=int, default=32, help="tokens per caption kept, as in training (default 32)")
    prune.add_argument("--preset", help="architecture preset, for checkpoints without a config")
    prune.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                       help="weight dtype written (default float32)")
    prune.add_argument("--json", action="store_true", help="print the summary as JSON")
    prune.set_defaults(func=_prune)


def _prune(args: argparse.Namespace) -> int:
    from .config import DataConfig, TrainConfigError
    from .prune import prune_checkpoint
    from ..models.config import ConfigError
    from ..models.inherit import InheritError
    from ..models.openclip import CheckpointError

    try:
        data = DataConfig(dataset=args.data, train_size=args.samples, max_text_len=args.max_text_len)
        summary = prune_checkpoint(args.checkpoint, args.out, data, preset=args.preset, dtype=args.dtype,
                                   scan=args.samples)
    except (TrainConfigError, ConfigError, CheckpointError, InheritError, ValueError, OSError) as err:
        print(f"coca-edge prune-vocab: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"kept {summary['tokens']} of {summary['vocab_size']} tokens: {summary['params_before'] / 1e6:.2f}M -> "
              f"{summary['params_after'] / 1e6:.2f}M parameters ({summary['ratio']:.3f}x), "
              f"{summary['bytes'] / 1e6:.1f} MB -> {summary['out']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointCorruptError, CheckpointSaveError
    from .config import TrainConfigError, load_config
    from .trainer import distill, train
    from ..models.config import ConfigError
    from ..models.openclip import CheckpointError

    flags = {"output_dir": args.output_dir, "steps": args.steps, "init": args.init,
             "model": getattr(args, "model", None) or getattr(args, "student", None),
             "teacher.path": getattr(args, "teacher", None)}
    overrides = list(args.overrides) + [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_config(args.config, overrides)
        run = distill if args.mode == "distill" else train
        result = run(cfg, resume=args.resume, progress=not args.no_progress)
    except (TrainConfigError, ConfigError, CheckpointError, CheckpointCorruptError, CheckpointSaveError) as err:
        print(f"coca-edge {args.mode}: error: {err}", file=sys.stderr)
        return 2
    if result.final_dir is not None:
        summary = {k: v for k, v in result.eval.items() if k != "examples"}
        print(json.dumps({"final": str(result.final_dir), "step": result.step, "params": result.params,
                          "seconds": round(result.seconds, 1), "eval": summary}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coca_edge.distill.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
