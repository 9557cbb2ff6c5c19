"""``coca-edge export``: checkpoint or preset -> verified bundle."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .specs import GRAPH_NAMES

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint (or a preset with random weights) to an ONNX bundle",
        description="Export split ONNX graphs (image_encoder, text_encoder, cross_kv, KV-cached decoder) "
                    "plus config, tokenizer and a hashed manifest. Every graph is validated against PyTorch "
                    "on shapes that differ from the export shapes before the bundle is written.",
        epilog='examples:\n  coca-edge export recipes/demo_teacher/model.safetensors --out bundles/demo\n  coca-edge export ~/hub/coca_ViT-L-14 --out bundles/l14          # an open_clip snapshot directory\n  coca-edge export model.bin --preset coca_ViT-B-32 --out bundles/b32\n  coca-edge export test-tiny --out bundles/tiny                   # a preset with random weights', formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="open_clip / coca-edge checkpoint file or snapshot directory, or a preset name "
                                 "(see `coca-edge models`; presets get seeded random weights, for testing)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--preset", help="architecture of a checkpoint that has no config beside it (e.g. coca_ViT-L-14)")
    p.add_argument("--graphs", default=",".join(GRAPH_NAMES), help="comma-separated graphs (default: all)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (default dynamo; see docs/export.md for why)")
    p.add_argument("--fuse-cross-kv", action="store_true",
                   help="compute the decoder's cross-attention K/V inside image_encoder (one graph less)")
    p.add_argument("--seed", type=int, default=0, help="seed for preset random weights")
    p.add_argument("--no-validate", action="store_true", help="skip the ORT-vs-PyTorch check (not recommended)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=_run)


def _load_model(args: argparse.Namespace):
    import torch

    from coca_edge.models import CoCa, get_preset, list_presets
    from coca_edge.models.openclip import load_checkpoint

    if not Path(args.model).exists():
        if args.model in list_presets():
            torch.manual_seed(args.seed)
            return CoCa(get_preset(args.model)).eval(), {"preset": args.model, "weights": f"random(seed={args.seed})"}
        raise FileNotFoundError(f"{args.model}: no such checkpoint, and not a preset "
                                f"(presets: {', '.join(list_presets())})")
    model = load_checkpoint(args.model, preset=args.preset)
    return model, {"path": str(Path(args.model).resolve()), "preset": args.preset or model.config.name}


def _run(args: argparse.Namespace) -> int:
    from .bundle import export_bundle

    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    model, source = _load_model(args)
    out = export_bundle(model, args.out, source_model=source, graphs=graphs, opset=args.opset,
                        exporter=args.exporter, fuse_cross_kv=args.fuse_cross_kv, validate=not args.no_validate,
                        overwrite=args.overwrite)
    manifest = json.loads((out / "manifest.json").read_text())
    summary = {name: {"file": g["file"], "max_abs_vs_pytorch": g["validation"]["max_abs"]}
               for name, g in manifest["graphs"].items()}
    if args.json:
        print(json.dumps({"bundle": str(out), "graphs": summary}, indent=2))
    else:
        print(f"bundle written to {out}")
        for name, s in summary.items():
            err = s["max_abs_vs_pytorch"]
            print(f"  {name:<14} {s['file']:<20} max-abs vs PyTorch: {'not validated' if err is None else f'{err:.2e}'}")
    return 0
