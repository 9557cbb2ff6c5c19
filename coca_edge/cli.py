"""``coca-edge`` command line: one subcommand per stage.

Stage modules register their own subcommands (``register(subparsers)``) and are imported
lazily, so ``coca-edge --help`` stays fast and a torch-free install can still run the
runtime commands.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

# Modules that add subcommands through ``register(subparsers)``; missing optional
# dependencies only disable their own commands.
_STAGE_MODULES = ("coca_edge.data.cli", "coca_edge.distill.cli", "coca_edge.exporters.cli", "coca_edge.runtime.cli",
                  "coca_edge.pipeline")


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from .models import CoCa, get_preset, list_presets

    rows = []
    for name in list_presets():
        cfg = get_preset(name)
        with torch.device("meta"):
            model = CoCa(cfg)
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        rows.append({
            "name": name,
            "image_size": cfg.vision.image_size,
            "visual": count(model.visual),
            "text": count(model.text),
            "decoder": count(model.decoder),
            "total": count(model),
            "description": cfg.description,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    reference = next((r["total"] for r in rows if r["name"] == "coca_ViT-B-32"), None)
    header = f"{'preset':<16}{'px':>5}{'visual':>10}{'text':>10}{'decoder':>10}{'total':>10}{'vs B-32':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['total'] / reference:.3f}" if reference else "-"
        print(f"{r['name']:<16}{r['image_size']:>5}{r['visual'] / 1e6:>9.2f}M{r['text'] / 1e6:>9.2f}M"
              f"{r['decoder'] / 1e6:>9.2f}M{r['total'] / 1e6:>9.2f}M{ratio:>9}")
    if args.verbose:
        print()
        for r in rows:
            print(f"{r['name']}: {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="coca-edge",
        description="Distill, quantize, export and validate CoCa models for edge devices.")
    parser.add_argument("--version", action="version", version=f"coca-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    models = sub.add_parser("models", help="list architecture presets with parameter counts per tower",
                            description="List the architecture presets (JSON data in coca_edge/models/presets) "
                                        "with parameter counts per tower.")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument("-v", "--verbose", action="store_true", help="also print each preset's description")
    models.set_defaults(func=_cmd_models)
    for module_name in _STAGE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            if getattr(err, "name", "") and not err.name.startswith("coca_edge"):
                continue  # an optional dependency of that stage is not installed
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as err:
        # Library errors are typed ValueError subclasses with messages written for users: bad
        # input or usage, exit 2 (1 is reserved for "ran, and a gate / check failed").
        print(f"coca-edge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
