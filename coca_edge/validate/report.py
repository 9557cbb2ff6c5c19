"""Reports of a validation: report.json (all numbers), report.md (tables), report.html (self-contained).

The HTML inlines its matplotlib plots and sample images as base64 PNGs, so it can be mailed or
archived as one file. Everything is staged in a temporary folder and renamed into place.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["write_reports", "summary_rows", "format_table", "render_markdown", "render_html", "to_json"]

_MAX_GRID = 12  # sample images per candidate in the caption grid


# ------------------------------------------------------------------ numbers and tables


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        # JSON has no inf/NaN: an identical tensor's SQNR is written as the string "inf"
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def to_json(report) -> str:
    return json.dumps(_jsonable(report.to_dict()), indent=2)


def _fmt(value: Any, kind: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "pt":
        return f"{value:+.2f}"
    if kind == "mb":
        return f"{value / 1e6:.1f}"
    if kind == "ms":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_COLUMNS = (
    # header, metric, format
    ("size MB", "bytes", "mb"), ("b1 ms", "latency_b1_ms", "ms"), ("b8 ms", "latency_b8_ms", "ms"),
    ("zs top1", "zero_shot_top1", "pct"), ("drop pt", "zero_shot_top1_drop", "pt"),
    ("R@1", "retrieval_R@1", "pct"), ("drop pt", "retrieval_R@1_drop", "pt"),
    ("cap exact", "caption_exact_match", "pct"), ("halluc", "hallucination_rate", "pct"),
)


def _gate_verdict(result) -> str:
    if not result.gate_results:
        return "-"
    failed = sum(not g.passed for g in result.gate_results)
    if failed:
        return f"FAIL {failed}/{len(result.gate_results)}"
    # "PASS~n": n gates passed only because their miss was within the sample noise
    noisy = sum(g.within_noise for g in result.gate_results)
    return f"PASS~{noisy}" if noisy else "PASS"


def summary_rows(report) -> list[list[str]]:
    """Header row, then the reference and one row per candidate."""
    rows = [["model", *[c[0] for c in _COLUMNS], "gates"]]
    for kind, result in [("ref", report.reference), *[("cand", r) for r in report.results]]:
        name = result.name + (" (reference)" if kind == "ref" else "")
        rows.append([name, *[_fmt(result.metrics.get(m), f) for _, m, f in _COLUMNS],
                     "-" if kind == "ref" else _gate_verdict(result)])
    return rows


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if _noise_legend_needed(rows):
        lines.append(_NOISE_LEGEND + "; the reasons are in report.md")
    return "\n".join(lines)


_NOISE_LEGEND = ("PASS~n: n gates missed their threshold by less than the sample noise (z x standard error at "
                 "the gates file's confidence)")


def _noise_legend_needed(rows: Sequence[Sequence[str]]) -> bool:
    return any(c.startswith("PASS~") for r in rows[1:] for c in r)


def _md_table(rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def render_markdown(report) -> str:
    d, summary = report.data, summary_rows(report)
    lines = [f"# Validation report: {'PASSED' if report.passed else 'FAILED'}", "",
             f"Reference `{report.reference.spec}`; data `{d['source']}` ({d['images']} images, "
             f"{d['captioned']} captioned, {d['texts']} texts, per-graph tensors on {d['tensor_samples']} samples); "
             f"{report.seconds:.0f} s.", "", _md_table(summary), ""]
    if _noise_legend_needed(summary):
        lines += [_NOISE_LEGEND + "; each such gate's row below says by how much.", ""]
    for note in report.notes:
        lines.append(f"- note: {note}")
    for r in report.results:
        lines += ["", f"## {r.name}", ""]
        if r.gate_results:
            lines += ["| gate | allowed | measured | verdict |", "|---|---|---|---|"]
            lines += [f"| `{g.name}` | {g.op} {g.allowed:g} | {_fmt(g.measured)} | "
                      f"{('pass within noise: ' + g.reason) if g.within_noise else 'pass' if g.passed else 'FAIL: ' + g.reason} |"
                      for g in r.gate_results]
            lines.append("")
        lines += ["| graph.output | cosine min | SQNR dB | max abs | mean abs | p99 abs |", "|---|---|---|---|---|---|"]
        for graph, outs in r.tensor.items():
            for name, s in outs.items():
                lines.append(f"| `{graph}.{name}` | {_fmt(s['cosine_min'])} | {_fmt(s['sqnr_db'])} | "
                             f"{_fmt(s['max_abs'])} | {_fmt(s['mean_abs'])} | {_fmt(s['p99_abs'])} |")
        lines.append(f"\n`decoder.logits.top1_agreement` = {_fmt(r.metrics.get('decoder.logits.top1_agreement'))}")
        if r.localization:
            lines += ["", "Nodes adding the most error:", "",
                      "| graph | node | op | output | SQNR dB | added dB |", "|---|---|---|---|---|---|"]
            lines += [f"| {n.graph} | `{n.node}` | {n.op_type} | `{n.output}` | {_fmt(n.sqnr_db)} | "
                      f"{_fmt(n.added_error_db)} |" for n in r.localization]
        differ = [c for c in r.captions if c["differs"]]
        if differ:
            lines += ["", f"{len(differ)} of {len(r.captions)} captions differ from the reference's, e.g.:", ""]
            lines += [f"- #{c['row']}: reference \"{c['reference']}\" / candidate \"{c['candidate']}\""
                      for c in differ[:5]]
        for note in r.notes:
            lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _short(result) -> str:
    if result.label:
        return result.label
    return os.path.basename(str(result.spec).rstrip("/")) or str(result.spec)


def _plots(report) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plots: dict[str, str] = {}
    results = report.results
    # Embedding cosines exist only for same-architecture candidates (not --different-architecture).
    has_cosines = any(r.cosines.get(k) is not None and r.cosines[k].size
                      for r in results for k in ("image_embed", "text_embed"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2)) if has_cosines else (None, ())
    for ax, key in zip(axes, ("image_embed", "text_embed")):
        found = [r.cosines[key] for r in results if r.cosines.get(key) is not None and r.cosines[key].size]
        # a fixed range: identical models put every sample at 1.0 (+- rounding), which numpy cannot bin
        lo = min([1.0 - 1e-6, *(float(v.min()) for v in found)])
        hi = max([1.0, *(float(v.max()) for v in found)])
        for r in results:
            values = r.cosines.get(key)
            if values is not None and values.size:
                ax.hist(values, bins=30, range=(lo, hi), alpha=0.6, label=_short(r))
        ax.set_title(f"{key}: per-sample cosine vs reference")
        ax.set_xlabel("cosine")
        ax.set_ylabel("samples")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.legend(fontsize=7)
    if has_cosines:
        plots["cosine"] = _png(fig)

    keys = [k for k in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")
            if k in report.reference.metrics]
    if keys:
        fig, ax = plt.subplots(figsize=(10, 3.2))
        rows = [report.reference, *results]
        width = 0.8 / len(rows)
        for i, r in enumerate(rows):
            ax.bar(np.arange(len(keys)) + i * width, [r.metrics.get(k, 0.0) for k in keys], width,
                   label=_short(r) + (" (ref)" if i == 0 else ""))
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
        ax.set_ylim(0, 1.05)
        ax.set_title("retrieval recall@K")
        ax.legend(fontsize=7)
        plots["recall"] = _png(fig)

    fig, ax = plt.subplots(figsize=(10, 3.2))
    drew = False
    for r in results:
        first = [c["first_divergence"] for c in r.captions if c["differs"]]
        if first:
            ax.hist(first, bins=np.arange(0, max(first) + 2) - 0.5, alpha=0.6, label=f"{_short(r)} ({len(first)})")
            drew = True
    if not drew:
        ax.text(0.5, 0.5, "every candidate caption equals the reference's", ha="center", va="center")
    else:
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-1, max(5, *(c["first_divergence"] for r in results for c in r.captions)) + 1)
    ax.set_title("first divergence position (token index) of captions that differ")
    ax.set_xlabel("token index")
    plots["divergence"] = _png(fig)

    acc_key = "zero_shot_top1" if "zero_shot_top1" in report.reference.metrics else "retrieval_R@1"
    for name, x_key, scale, label in (("latency", "latency_b1_ms", 1.0, "end-to-end caption latency b1 (ms)"),
                                      ("size", "bytes", 1e-6, "size on disk (MB)")):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for i, r in enumerate([report.reference, *results]):
            x, y = r.metrics.get(x_key), r.metrics.get(acc_key)
            if x is None or y is None:
                continue
            ax.scatter([x * scale], [y], marker="*" if i == 0 else "o", s=80)
            ax.annotate(_short(r) + (" (ref)" if i == 0 else ""), (x * scale, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlim(left=0)  # from zero: equal sizes must not become an axis of rounding noise
        ax.set_xlim(right=max(ax.get_xlim()[1], 1e-9) * 1.15)
        ax.ticklabel_format(useOffset=False)
        ax.set_xlabel(label)
        ax.set_ylabel(acc_key)
        ax.set_title(f"{acc_key} vs {name}")
        plots[f"acc_{name}"] = _png(fig)
    fig = frontier_figure(report)
    if fig is not None:
        plots["frontier"] = _png(fig)
    return plots


_FRONTIER = (("zero_shot_top1", "zero-shot top-1"), ("retrieval_R@1", "retrieval R@1"),
             ("binding", "binding"), ("hallucination_rate", "hallucination rate"))


def frontier_figure(report):
    """Size / fidelity frontier: each model's task metrics against its parameter count (log
    axis, relative to the reference), accuracy as a share of the reference's on the left and
    hallucination / binding on the right; one marker per model, one colour per metric. None
    unless the models differ in parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in (report.reference, *report.results) if r.metrics.get("params")]
    ref = report.reference.metrics
    if len(rows) < 2 or len({r.metrics["params"] for r in rows}) < 2 or not ref.get("params"):
        return None
    markers = "*oDs^v<>ph"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = ((left, _FRONTIER[:2], True), (right, _FRONTIER[2:], False))
    for ax, metrics, relative in panels:
        for c, (key, label) in enumerate(metrics):
            if key not in ref or (relative and not ref[key]):
                continue
            for i, r in enumerate(rows):
                value = r.metrics.get(key)
                if value is None:
                    continue
                y = 100 * value / ref[key] if relative else 100 * value
                ax.scatter([r.metrics["params"] / ref["params"]], [y], marker=markers[i % len(markers)],
                           color=colours[c], s=110 if i == 0 else 45, zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("parameters / reference's")
        ax.grid(alpha=0.3)
        ax.legend(handles=[Line2D([], [], ls="", marker="o", color=colours[c], label=label)
                           for c, (key, label) in enumerate(metrics) if key in ref], fontsize=7, loc="best")
    left.axhline(95, color="grey", lw=0.8, ls="--")
    left.set_ylabel("% of the reference")
    left.set_title("accuracy vs parameters (dashed: 95%)")
    if "hallucination_rate" in ref:
        right.axhline(100 * ref["hallucination_rate"] + 2, color="grey", lw=0.8, ls="--")
    right.set_ylabel("%")
    right.set_title("faithfulness vs parameters (dashed: reference's hallucination + 2 pt)")
    fig.legend(handles=[Line2D([], [], ls="", marker=markers[i % len(markers)], color="black",
                               label=_short(r) + (" (reference)" if i == 0 else ""))
                        for i, r in enumerate(rows)],
               fontsize=7, loc="lower center", ncol=min(3, len(rows)), bbox_to_anchor=(0.5, -0.14))
    return fig


# ------------------------------------------------------------------ html


def _marked(caption: str, scene: Any) -> str:
    """The caption with words naming a colour, shape or size that no object of the scene has in <mark>."""
    if scene is None:
        return html.escape(caption)
    from ..data.synthetic import COLORS, SHAPES, SIZE_WORDS

    sizes = {word: size for size, words in SIZE_WORDS.items() for word, _ in words}
    present = {a for obj in scene.objects for a in (obj.color, obj.shape, obj.size)}
    out = []
    for word in caption.split():
        w = word.strip(",.").lower()
        attr = w if (w in COLORS or w in SHAPES) else sizes.get(w)
        if attr is not None and attr not in present:
            out.append(f"<mark>{html.escape(word)}</mark>")
        else:
            out.append(html.escape(word))
    return " ".join(out)


def _thumb(pixels: np.ndarray) -> str:
    from PIL import Image

    img = Image.fromarray(pixels)
    scale = max(1, 128 // max(img.size))
    img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.fail{background:#fdd}.pass{background:#dfd}.verdict{font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:260px;border:1px solid #ccc;padding:6px;font-size:12px;overflow-wrap:anywhere}
.card img{image-rendering:pixelated;width:128px;height:128px}mark{background:#fbb}
img.plot{max-width:100%}.note{color:#666;font-size:13px}
"""


_NUMBER = re.compile(r"(?:[<>=]=?\s*)?[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)%?|-")


def _numeric(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text.strip()))


def _table_html(rows: Sequence[Sequence[str]], verdict_col: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>"]
    for row in rows[1:]:
        cells = []
        for i, c in enumerate(row):
            cls = "num" if i and _numeric(c) else ""
            if i == verdict_col and c not in ("-", ""):
                cls = "verdict " + ("pass" if c.startswith("PASS") else "fail")
            cells.append(f'<td class="{cls}">{html.escape(c)}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def render_html(report, images: Any = None, plots: dict[str, str] | None = None) -> str:
    """``images(rows) -> uint8 [n, H, W, 3]`` supplies the sample grid (the validator's data);
    ``plots``: :func:`_plots` of the report when the caller already has them."""
    d, summary = report.data, summary_rows(report)
    plots = _plots(report) if plots is None else plots
    verdict = "PASSED" if report.passed else "FAILED"
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>coca-edge validation: {verdict}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Validation report: <span class=\"verdict {'pass' if report.passed else 'fail'}\">{verdict}</span></h1>",
             f"<p>Reference <code>{html.escape(report.reference.spec)}</code>; data <code>{html.escape(d['source'])}"
             f"</code>: {d['images']} images, {d['captioned']} captioned, {d['texts']} texts; per-graph tensors on "
             f"{d['tensor_samples']} samples; greedy captions up to {d['max_new_tokens']} tokens; "
             f"{report.seconds:.0f} s.</p>",
             '<h2 id="summary">Summary</h2>', _table_html(summary, verdict_col=len(_COLUMNS) + 1)]
    if _noise_legend_needed(summary):
        parts.append(f'<p class="note">{html.escape(_NOISE_LEGEND)}; each such gate\'s row below says by how much.</p>')
    parts += [f'<p class="note">note: {html.escape(n)}</p>' for n in report.notes]
    parts.append('<h2 id="plots">Plots</h2>')
    for key in ("cosine", "recall", "divergence", "acc_latency", "acc_size", "frontier"):
        if key in plots:
            parts.append(f'<img class="plot" alt="{key}" src="data:image/png;base64,{plots[key]}">')
    scenes = None
    if report.validator is not None and report.validator.data.captioning is not None:
        scenes = report.validator.data.captioning.task.scenes
    for r in report.results:
        parts.append(f'<h2 class="candidate">{html.escape(r.name)}</h2>')
        if r.gate_results:
            rows = [["gate", "allowed", "measured", "verdict", "reason"]]
            rows += [[g.name, f"{g.op} {g.allowed:g}", _fmt(g.measured), "PASS~" if g.within_noise else "PASS" if g.passed else "FAIL", g.reason]
                     for g in r.gate_results]
            parts.append('<h3>Gates</h3>' + _table_html(rows, verdict_col=3).replace('<table>', '<table class="gates">', 1))
        rows = [["graph.output", "cosine min", "SQNR dB", "max abs", "mean abs", "p99 abs"]]
        rows += [[f"{g}.{o}", *[_fmt(s[k]) for k in ("cosine_min", "sqnr_db", "max_abs", "mean_abs", "p99_abs")]]
                 for g, outs in r.tensor.items() for o, s in outs.items()]
        rows.append(["decoder.logits.top1_agreement", _fmt(r.metrics.get("decoder.logits.top1_agreement")),
                     "", "", "", ""])
        parts.append("<h3>Tensors (each graph fed the reference's inputs)</h3>" + _table_html(rows))
        if r.localization:
            rows = [["graph", "node", "op", "output", "cosine", "SQNR dB", "max abs", "added dB"]]
            rows += [[n.graph, n.node, n.op_type, n.output, _fmt(n.cosine), _fmt(n.sqnr_db), _fmt(n.max_abs),
                      _fmt(n.added_error_db)] for n in r.localization]
            parts.append("<h3>Nodes adding the most error</h3>" + _table_html(rows))
        differ = [c for c in r.captions if c["differs"]]
        parts.append(f"<h3>Captions that differ ({len(differ)} of {len(r.captions)})</h3>")
        if differ and images is not None:
            shown = differ[:_MAX_GRID]
            pics = images([c["row"] for c in shown])
            cap_index = {int(row): k for k, row in enumerate(report.validator.caption_rows)} if scenes else {}
            cards = []
            for c, pic in zip(shown, pics):
                scene = scenes[cap_index[c["row"]]] if scenes is not None else None
                hall = (f"<br>hallucinated mentions: reference {c.get('hallucinated_reference', '-')}, "
                        f"candidate {c.get('hallucinated_candidate', '-')}") if "hallucinated_candidate" in c else ""
                cards.append(f'<div class="card"><img alt="sample {c["row"]}" src="data:image/png;base64,'
                             f'{_thumb(pic)}"><br><b>reference:</b> {_marked(c["reference"], scene)}<br>'
                             f'<b>candidate:</b> {_marked(c["candidate"], scene)}<br>first divergence at token '
                             f'{c["first_divergence"]}{hall}</div>')
            parts.append('<div class="grid">' + "".join(cards) + "</div>")
            parts.append('<p class="note">Marked words name a colour, shape or size that no object in the image has.'
                         "</p>")
        elif not differ:
            parts.append("<p>Every caption equals the reference's.</p>")
        parts += [f'<p class="note">note: {html.escape(n)}</p>' for n in r.notes]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(report, out_dir: str | os.PathLike) -> Path:
    """Write report.json, report.md and report.html into ``out_dir``; each file appears only complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    validator = report.validator
    images = validator.data.display_images if validator is not None else None
    plots = _plots(report)
    texts = {"report.json": to_json(report), "report.md": render_markdown(report),
             "report.html": render_html(report, images, plots)}
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    if "frontier" in plots:  # also as a file, for docs and the pipeline's summary
        tmp = out_dir / ".frontier.png.tmp"
        tmp.write_bytes(base64.b64decode(plots["frontier"]))
        os.replace(tmp, out_dir / "frontier.png")
    return out_dir
