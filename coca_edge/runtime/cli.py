"""``coca-edge caption`` / ``coca-edge classify``: run a bundle with ONNX Runtime (torch-free)."""
from __future__ import annotations

import argparse
import json

from .generation import STRATEGIES

__all__ = ["register"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory written by `coca-edge export`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--providers", help="comma-separated ONNX Runtime providers (default: TensorRT, CUDA, CPU - "
                                       "whichever this onnxruntime has)")
    p.add_argument("--threads", type=int, help="intra-op threads per session")
    p.add_argument("--memory", choices=("default", "lean", "low"), default="default",
                   help="'lean': no activation arena (same speed, less memory); 'low': also each weight once in "
                        "memory and no pre-packed copies (slower; small devices). See docs/edge.md")
    p.add_argument("--no-optimized-cache", action="store_true",
                   help="do not keep ONNX Runtime's optimised graphs in $XDG_CACHE_HOME/coca-edge/optimized-graphs "
                        "(the cache opens sessions ~3x faster the next time and costs one more copy of the weights "
                        "on disk; docs/edge.md)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("caption", help="caption images with a bundle",
                       description="Generate captions with the KV-cached decoder of a bundle.",
        epilog='examples:\n  coca-edge caption bundles/demo img1.png img2.png\n  coca-edge caption bundles/demo photo.jpg --strategy beam --num-beams 3 --json', formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(c)
    c.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    c.add_argument("--max-new-tokens", type=int, default=20)
    c.add_argument("--min-new-tokens", type=int, default=0)
    c.add_argument("--num-beams", type=int, default=3)
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, help="seed for top_k / top_p sampling")
    c.add_argument("--batch-size", type=int, default=8)
    c.set_defaults(func=_caption)

    k = sub.add_parser("classify", help="zero-shot classify images with a bundle",
                       description="Zero-shot classification: each label is embedded through the prompt templates.",
        epilog='example:\n  coca-edge classify bundles/demo photo.jpg --labels "cat,dog,car" --templates "a photo of a {}."', formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(k)
    k.add_argument("--labels", required=True, help="comma-separated class names, or @FILE with one per line")
    k.add_argument("--templates", default="a photo of a {}.",
                   help="'|'-separated prompt templates with {} for the label (default: 'a photo of a {}.')")
    k.add_argument("--top", type=int, default=3, help="labels to show per image")
    k.set_defaults(func=_classify)


def _load(args: argparse.Namespace):
    from .edge import EdgeCoCa

    providers = [p.strip() for p in args.providers.split(",")] if args.providers else None
    return EdgeCoCa.load(args.bundle, providers=providers, threads=args.threads, memory=args.memory,
                         optimized_cache=not args.no_optimized_cache)


def _caption(args: argparse.Namespace) -> int:
    model = _load(args)
    captions = model.caption(args.images, strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"image": i, "caption": c} for i, c in zip(args.images, captions)], indent=2))
    else:
        for image, caption in zip(args.images, captions):
            print(f"{image}\t{caption}")
    return 0


def _read_labels(spec: str) -> list[str]:
    if spec.startswith("@"):
        with open(spec[1:], encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
    else:
        labels = [s.strip() for s in spec.split(",") if s.strip()]
    if not labels:
        raise ValueError(f"--labels {spec!r}: no labels")
    return labels


def _classify(args: argparse.Namespace) -> int:
    model = _load(args)
    labels = _read_labels(args.labels)
    templates = [t for t in args.templates.split("|") if t]
    results = model.classify(args.images, labels, templates=templates)
    if args.json:
        print(json.dumps([{"image": i, "label": r.label, "top": r.top(args.top)}
                          for i, r in zip(args.images, results)], indent=2))
    else:
        for image, r in zip(args.images, results):
            top = ", ".join(f"{label} {p:.3f}" for label, p in r.top(args.top))
            print(f"{image}\t{r.label}\t({top})")
    return 0
