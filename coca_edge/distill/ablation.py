"""What each kind of knowledge buys: the same student with no KD, each KD term alone, all of
them, and weight inheritance, at the same number of steps and at the same wall-clock.

    python -m coca_edge.distill.ablation recipes/demo_distill.yaml --out runs/ablation

The recipe gives the student, the teacher, the data and the step count; each variant only
changes the KD weights and the initialisation. "Same wall-clock" gives every variant the
number of steps it runs in the time the no-KD student takes for the recipe's steps (its
throughput measured in the same-steps run; for the live teacher, in a short probe run), so
every schedule still completes. Writes ``ablation.json`` and ``ablation.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import KD_TERMS, TrainConfig, load_config
from .trainer import resolve_model_config, train

__all__ = ["VARIANTS", "run_ablation", "main"]

_TOKEN_KD = ("affinity", "feature", "caption_kd")
# name: (KD weights switched on, init). "all KD" is the three kinds of knowledge on
# ground-truth captions; sequence-level KD (captions the teacher generates) is its own row.
VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    "no KD": ((), "scratch"),
    "affinity": (("affinity",), "scratch"),
    "feature": (("feature",), "scratch"),
    "caption_kd": (("caption_kd",), "scratch"),
    "caption_seq_kd": (("caption_seq_kd",), "scratch"),
    "all KD": (_TOKEN_KD, "scratch"),
    "inherit, no KD": ((), "inherit"),
    "inherit + all KD": (_TOKEN_KD, "inherit"),
    "inherit + caption_seq_kd": (("caption_seq_kd",), "inherit"),
    "inherit + all KD + caption_seq_kd": (_TOKEN_KD + ("caption_seq_kd",), "inherit"),
}
_METRICS = ("zero_shot_top1", "retrieval_R@1", "bleu4", "cider", "caption_exact")


def _variant(base: TrainConfig, name: str, out: Path, steps: int, live: bool = False) -> TrainConfig:
    terms, init = VARIANTS[name]
    weights = {t: (getattr(base.loss, t) or 1.0) if t in terms else 0.0 for t in KD_TERMS}
    loss = dataclasses.replace(base.loss, **weights)
    teacher = dataclasses.replace(base.teacher, use_cache=not live)
    slug = name.replace(" ", "_").replace(",", "").replace("+", "plus")
    return dataclasses.replace(base, loss=loss, teacher=teacher, init=init, steps=steps,
                               output_dir=str(out / slug), save_every=max(steps, 1),
                               eval=dataclasses.replace(base.eval, every=0, at_end=True))


def _rate(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # first window includes warm-up
    return sum(rates) / len(rates) if rates else float("nan")


def _row(name: str, budget: str, cfg: TrainConfig, result) -> dict[str, Any]:
    return {"variant": name, "budget": budget, "steps": result.step, "seconds": round(result.seconds, 1),
            "samples_per_s": round(_rate(Path(cfg.output_dir)), 1),
            **{m: result.eval.get(m) for m in _METRICS}, "examples": result.eval.get("examples", [])[:3]}


def _teacher_eval(base: TrainConfig) -> dict[str, Any]:
    from ..models.openclip import load_checkpoint
    from .evaluate import Evaluator

    preset = resolve_model_config(base.teacher.preset) if base.teacher.preset else None
    teacher = load_checkpoint(base.teacher.path, preset=preset)
    ev = Evaluator(teacher.config.vision.image_size, base.eval.split, base.eval.n, base.eval.captions, seed=base.data.seed)
    params = sum(p.numel() for p in teacher.parameters())
    return {"variant": "teacher", "params": params, **{m: v for m, v in ev(teacher).items() if m in _METRICS}}


def run_ablation(base: TrainConfig, out: Path, wallclock: bool = True, live_probe_steps: int = 30,
                 variants: Sequence[str] | None = None) -> dict[str, Any]:
    """Train every variant (or those named in ``variants``; "no KD" always runs first: the
    wall-clock budget is its time) and write the tables as they fill."""
    names = list(VARIANTS) if not variants else ["no KD"] + [v for v in variants if v != "no KD"]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; variants are {list(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"recipe": base.to_dict(), "teacher": _teacher_eval(base), "rows": []}

    def save() -> None:
        (out / "ablation.json").write_text(json.dumps(report, indent=2))
        (out / "ablation.md").write_text(_markdown(report))

    rates: dict[str, float] = {}
    for name in names:
        cfg = _variant(base, name, out / "same-steps", base.steps)
        result = train(cfg, progress=False)
        report["rows"].append(_row(name, "same steps", cfg, result))
        report["student_params"] = result.params
        rates[name] = _rate(Path(cfg.output_dir))
        save()
    if wallclock:
        probe = _variant(base, "all KD", out / "probe-live", live_probe_steps, live=True)
        probe = dataclasses.replace(probe, log_every=max(1, live_probe_steps // 3), eval=dataclasses.replace(probe.eval, at_end=False))
        train(probe, progress=False)
        rates["all KD, live teacher"] = _rate(Path(probe.output_dir))
        for name in names[1:] + ["all KD, live teacher"]:
            live = name.endswith("live teacher")
            steps = max(1, round(base.steps * rates[name] / rates["no KD"]))
            cfg = _variant(base, "all KD" if live else name, out / "same-wallclock", steps, live=live)
            if live:
                cfg = dataclasses.replace(cfg, output_dir=str(out / "same-wallclock" / "all_KD_live_teacher"))
            result = train(cfg, progress=False)
            report["rows"].append(_row(name, "same wall-clock", cfg, result))
            save()
    save()
    return report


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _markdown(report: dict[str, Any]) -> str:
    t = report["teacher"]
    lines = [f"Teacher ({t['params'] / 1e6:.2f}M params): " + ", ".join(f"{m} {_fmt(t.get(m))}" for m in _METRICS), "",
             f"Student params: {report.get('student_params', 0) / 1e6:.2f}M", "",
             "| budget | variant | steps | s | samples/s | " + " | ".join(_METRICS) + " | zs % of teacher | R@1 % of teacher |",
             "|---|---|---|---|---|" + "---|" * len(_METRICS) + "---|---|"]
    for r in report["rows"]:
        zs = r["zero_shot_top1"] / t["zero_shot_top1"] * 100 if r.get("zero_shot_top1") is not None and t.get("zero_shot_top1") else None
        rr = r["retrieval_R@1"] / t["retrieval_R@1"] * 100 if r.get("retrieval_R@1") is not None and t.get("retrieval_R@1") else None
        lines.append(f"| {r['budget']} | {r['variant']} | {r['steps']} | {r['seconds']} | {r['samples_per_s']} | "
                     + " | ".join(_fmt(r.get(m)) for m in _METRICS) + f" | {_fmt(zs)} | {_fmt(rr)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coca_edge.distill.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="distillation recipe (the base config)")
    parser.add_argument("--out", default="runs/ablation", help="output directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-wallclock", action="store_true", help="only the same-steps table")
    parser.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS)
                        + " (default: all; 'no KD' always runs, it sets the wall-clock budget)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    try:
        report = run_ablation(load_config(args.recipe, args.overrides), Path(args.out),
                              wallclock=not args.no_wallclock, variants=variants)
    except ValueError as err:
        parser.error(str(err))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
