"""``coca-edge`` command line: one subcommand per stage.

Stage modules register their own subcommands (``register(subparsers)``) and are imported
lazily, so ``coca-edge --help`` stays fast and a torch-free install can still run the
runtime commands.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

# Modules that add subcommands through ``register(subparsers)``; missing optional
# dependencies only disable their own commands.
_STAGE_MODULES = ("coca_edge.data.cli", "coca_edge.distill.cli", "coca_edge.exporters.cli", "coca_edge.runtime.cli",
                  "coca_edge.pipeline", "coca_edge.exporters.trt_cli", "coca_edge.quantize.cli",
                  "coca_edge.validate.cli")

# The extra (pyproject.toml) that brings each optional top-level module the commands import.
# A torch-free device install (`coca-edge[ort]`) runs bundles; everything else says what to add.
_EXTRA_FOR = {"torch": "torch", "onnx": "torch", "onnxscript": "torch", "yaml": "torch", "tqdm": "torch",
              "safetensors": "torch", "onnxruntime": "ort", "webdataset": "data", "matplotlib": "data",
              "tensorboard": "tensorboard", "open_clip": "test", "torchvision": "test", "transformers": "test"}
# The commands each stage module registers, so that a command whose module cannot be imported on
# this install is still listed and explains itself instead of being an "invalid choice".
_STAGE_COMMANDS = {"coca_edge.distill.cli": ("train", "distill", "prune-vocab"), "coca_edge.exporters.cli": ("export",),
                   "coca_edge.runtime.cli": ("caption", "classify"), "coca_edge.pipeline": ("pipeline",),
                   "coca_edge.quantize.cli": ("quantize",), "coca_edge.validate.cli": ("validate",),
                   "coca_edge.exporters.trt_cli": ("build-engine",)}


def _unavailable(command: str, err: ImportError) -> str | None:
    """What to install for ``command`` when it failed to import ``err.name``; None if no extra brings it."""
    missing = (getattr(err, "name", None) or "").split(".")[0]
    extra = _EXTRA_FOR.get(missing)
    if extra is None:
        return None
    hint = ' (or "coca-edge[cpu]" for the whole CPU toolkit)' if extra == "torch" else ""
    return (f"coca-edge {command} needs {missing!r}, which this install does not have; it comes with the "
            f"{extra!r} extra: pip install \"coca-edge[{extra}]\"{hint}")


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
                                        "with parameter counts per tower.",
        epilog='example:\n  coca-edge models            # table with parameter counts per tower and the ratio to coca_ViT-B-32\n  coca-edge models --json -v', formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.add_argument("-v", "--verbose", action="store_true", help="also print each preset's description")
    models.set_defaults(func=_cmd_models)
    parser.set_defaults(unavailable={})
    for module_name in _STAGE_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            if not getattr(err, "name", "") or err.name.startswith("coca_edge"):
                raise
            # An optional dependency of that stage is not installed: list its commands with the fix.
            for command in _STAGE_COMMANDS.get(module_name, ()):
                message = _unavailable(command, err) or f"coca-edge {command} cannot import {err.name!r}"
                extra = _EXTRA_FOR.get(err.name.split(".")[0])
                sub.add_parser(command, add_help=False, help=f"(not installed: needs coca-edge[{extra}])" if extra
                               else f"(not installed: cannot import {err.name!r})")
                parser.get_default("unavailable")[command] = message
            continue
        module.register(sub)
    return parser


def _quiet_progress_when_logged() -> None:
    """Progress bars redraw up to 10 times a second; into a log file (stderr not a terminal)
    each redraw is kept, and a demo run wrote megabytes of them. There, redraw every 30 s
    instead. A ``TQDM_MININTERVAL`` the user set wins (tqdm reads it itself), and so does a
    bar's own ``mininterval``."""
    if sys.stderr.isatty() or "TQDM_MININTERVAL" in os.environ:
        return
    import functools

    try:
        import tqdm
    except ModuleNotFoundError:          # a device install ("[ort]") has no progress bars
        return

    # once; tqdm's own __init__ is already a partialmethod (its TQDM_* env wrapper), so the
    # mark is an attribute of ours (holding the original), not the wrapper's type
    if vars(tqdm.tqdm).get("_coca_edge_unquiet") is None:
        original = vars(tqdm.tqdm)["__init__"]
        tqdm.tqdm.__init__ = functools.partialmethod(original, mininterval=30.0)
        tqdm.tqdm._coca_edge_unquiet = original


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in parser.get_default("unavailable"):
        print(parser.get_default("unavailable")[command], file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _quiet_progress_when_logged()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        message = _unavailable(args.command, err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as err:
        # Library errors are typed ValueError subclasses with messages written for users: bad
        # input or usage, exit 2 (1 is reserved for "ran, and a gate / check failed").
        print(f"coca-edge {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
