"""``coca-edge data ...`` commands. The main CLI calls ``register(subparsers)``; each
command is ``args.func(args) -> exit code``. ``python -m coca_edge.data.cli`` runs them
on their own."""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any, Sequence

from .preprocess import DEFAULT_MAX_PIXELS
from .readers import DataError

__all__ = ["register", "main"]


def _separator(value: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(value, value)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=("synthetic-scenes", "fashion-mnist"), default=None,
                        help="built-in dataset (default: synthetic-scenes)")
    source.add_argument("--csv", metavar="FILE", help="CSV/TSV of image paths and captions (paths relative to the file)")
    source.add_argument("--coco", metavar="JSON", help="COCO captions JSON (captions_*.json)")
    source.add_argument("--wds", metavar="URLS", help="webdataset shards, e.g. 'data/{00000..00009}.tar'")
    source.add_argument("--folder", metavar="DIR", help="image folder with one sub-folder per class")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column with image paths (open_clip default: filepath)")
    p.add_argument("--csv-caption-key", default="title", help="CSV column with captions (open_clip default: title)")
    p.add_argument("--csv-separator", default="\t", type=_separator, help="CSV separator (open_clip default: tab)")
    p.add_argument("--coco-images", metavar="DIR", help="COCO image folder (default: guessed from the JSON name)")
    p.add_argument("--split", default="val", help="split of a built-in dataset (synthetic: train/val/test; fashion-mnist: train/test)")
    p.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    p.add_argument("--shuffle-seed", type=int, default=None, help="show a seeded random selection instead of the first samples")
    p.add_argument("--image-size", type=int, default=64, help="synthetic image size in px")


def _reader(args: argparse.Namespace) -> Any:
    from . import readers

    common = {"seed": args.shuffle_seed, "max_pixels": DEFAULT_MAX_PIXELS}
    if args.csv:
        return readers.CsvReader(args.csv, args.csv_img_key, args.csv_caption_key, args.csv_separator, **common)
    if args.coco:
        return readers.CocoCaptionsReader(args.coco, args.coco_images, **common)
    if args.wds:
        return readers.WebDatasetReader(args.wds, shuffle_buffer=1000 if args.shuffle_seed is not None else 0, **common)
    if args.folder:
        return readers.ImageFolderReader(args.folder, **common)
    if args.dataset == "fashion-mnist":
        from .fashion_mnist import FashionMNIST

        return FashionMNIST("test" if args.split == "val" else args.split)
    from .synthetic import SyntheticScenes

    return SyntheticScenes(args.split, seed=args.seed, image_size=args.image_size, shuffle_seed=args.shuffle_seed)


def _preview(args: argparse.Namespace) -> int:
    from .preview import save_contact_sheet

    try:
        reader = _reader(args)
        samples = list(itertools.islice(iter(reader), args.n))
    except (DataError, ValueError) as exc:
        print(f"coca-edge data preview: {exc}", file=sys.stderr)
        return 2
    if not samples:
        print("coca-edge data preview: no samples", file=sys.stderr)
        return 2
    save_contact_sheet(samples, args.out, cols=args.cols, cell=args.cell)
    skipped = getattr(reader, "skipped", None)
    note = f"; {skipped.summary()}" if skipped is not None and skipped.total else ""
    print(f"wrote {args.out}: {len(samples)} samples{note}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .synthetic import SceneConfig, write_synthetic

    try:
        files = write_synthetic(
            args.out, args.split, args.n, fmt=args.format, seed=args.seed,
            config=SceneConfig(image_size=args.image_size), shard_size=args.shard_size,
            image_format=args.image_format,
        )
    except ValueError as exc:
        print(f"coca-edge data generate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} {args.split} samples to {args.out}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from .tasks import synthetic_tasks

    tasks = synthetic_tasks(args.split, args.n, seed=args.seed, image_size=args.image_size)
    for name, task in tasks.items():
        chance = getattr(task, "chance", None)
        detail = ""
        if task.kind == "zero_shot":
            detail = f"classes={len(task.classnames)} e.g. {task.prompts[0][0]!r}"
        elif task.kind == "choice":
            detail = f"e.g. {task.candidates[0][0]!r}" if task.candidates else ""
        elif task.kind == "retrieval":
            detail = f"texts={len(task.texts)}"
        chance_text = f" chance={chance:.3f}" if chance is not None else ""
        print(f"{name:11s} {task.kind:10s} n={len(task.samples):4d}{chance_text} {detail}")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``data`` command (``preview``, ``generate``, ``tasks``)."""
    data = subparsers.add_parser("data", help="datasets: preview samples, write synthetic-scenes to disk, list tasks",
        epilog='examples:\n  coca-edge data preview --dataset synthetic-scenes --split val --n 16 --out preview.png\n  coca-edge data generate --out demo_images --split val --n 4\n  coca-edge data tasks', formatter_class=argparse.RawDescriptionHelpFormatter)
    data.set_defaults(func=lambda _args: (data.print_help(), 2)[1])
    sub = data.add_subparsers(dest="data_command", metavar="{preview,generate,tasks}")

    preview = sub.add_parser("preview", help="write a PNG contact sheet of samples with their captions")
    _add_source_args(preview)
    preview.add_argument("--n", type=int, default=16, help="number of samples")
    preview.add_argument("--cols", type=int, default=4)
    preview.add_argument("--cell", type=int, default=192, help="cell size in px")
    preview.add_argument("--out", default="preview.png", help="PNG to write")
    preview.set_defaults(func=_preview)

    generate = sub.add_parser("generate", help="write synthetic-scenes samples as CSV + PNGs or webdataset shards")
    generate.add_argument("--out", required=True, help="output folder")
    generate.add_argument("--split", default="train", choices=("train", "val", "test"))
    generate.add_argument("--n", type=int, default=1000)
    generate.add_argument("--format", default="csv", choices=("csv", "wds"))
    generate.add_argument("--image-format", default="png", choices=("png", "jpg", "webp"))
    generate.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--image-size", type=int, default=64)
    generate.set_defaults(func=_generate)

    tasks = sub.add_parser("tasks", help="list the evaluation tasks on synthetic-scenes")
    tasks.add_argument("--split", default="test", choices=("train", "val", "test"))
    tasks.add_argument("--n", type=int, default=500)
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--image-size", type=int, default=64)
    tasks.set_defaults(func=_tasks)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coca-edge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
