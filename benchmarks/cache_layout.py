"""Would per-layer KV-cache inputs and outputs make the decode step faster? (not a test)

    python benchmarks/cache_layout.py                  # coca_ViT-B-32, random weights
    python benchmarks/cache_layout.py --work DIR       # keep / reuse the bundles in DIR

The exported decoder takes each tower's cache stacked, ``past_text [L, 2, B, H, past, D]``,
and returns it stacked: inside the graph every layer's K and V are cut out of it (ORT: a
``Split`` and ``Squeeze`` copy) and after the ``Concat(past, new)`` stacked back
(``Unsqueeze`` + two ``Concat``s copy the whole cache again). An ORT profile of the INT8 step
at batch 8 (past 15) spends ~21% of its kernel time in those four ops. This rewrites the
shipped FP32 and INT8 (``cpu`` preset) decoders to take and return one tensor per layer,
K and V (the runtime would hold a list of arrays instead of two stacked ones), checks the
outputs are identical, and times one step against the shipped graphs, medians of
interleaved runs, same feeds. An experiment: not what ``coca-edge export`` writes.
Results go to ``benchmarks/results/cache_layout.json``.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, machine_info  # noqa: E402
from step_bench import fp32_and_int8_bundles, step_args  # noqa: E402
from quantize import _inputs  # noqa: E402  (same real feeds as benchmarks/quantize.py)


def per_layer(src: Path, dst: Path) -> list[tuple[str, int, int, str, str]]:
    """``src`` with ``past_text`` / ``past_decoder`` replaced by per-layer inputs
    ``past_<tower>_<k|v>_<layer>`` ``[batch, heads, past, head_dim]`` and the stacked presents by
    ``present_<tower>_<k|v>_<layer>`` (each layer's ``Concat(past, new)`` output): no layer
    ``Gather`` / ``Split`` in, no ``Unsqueeze`` + ``Concat`` stacking out. Returns
    ``(stacked input, layer, 0 for K / 1 for V, new input, new output)`` per cache tensor."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    m = onnx.load(str(src))
    g = m.graph
    cons = {}
    for n in g.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    ints = {i.name: int(nh.to_array(i)) for i in g.initializer if i.data_type == TP.INT64 and len(i.dims) == 0}
    rename, rename_in, new_in, new_out, names = {}, {}, [], [], []
    for past in ("past_text", "past_decoder"):
        tag = past.split("_")[1]
        for g1 in [n for n in cons[past] if n.op_type == "Gather"]:
            layer = ints[g1.input[1]]
            for g2 in cons[g1.output[0]]:
                if g2.op_type != "Gather":
                    raise SystemExit(f"{src}: {past} layer {layer} is read by {g2.op_type}, expected Gather")
                kv = "kv"[ints[g2.input[1]]]
                name = f"past_{tag}_{kv}_{layer}"
                rename_in[g2.output[0]] = name
                new_in.append(oh.make_tensor_value_info(name, TP.FLOAT, ["batch", "heads", "past", "head_dim"]))
                cat = [c for c in cons[g2.output[0]] if c.op_type == "Concat"]
                if len(cat) != 1:
                    raise SystemExit(f"{src}: {name}: expected one Concat(past, new)")
                out = f"present_{tag}_{kv}_{layer}"
                rename[cat[0].output[0]] = out
                new_out.append(oh.make_tensor_value_info(out, TP.FLOAT, ["batch", "heads", "total", "head_dim"]))
                names.append((past, layer, "kv".index(kv), name, out))
    for n in g.node:
        n.input[:] = [rename_in.get(x, rename.get(x, x)) for x in n.input]
        n.output[:] = [rename.get(x, x) for x in n.output]
    for n in g.node:  # the past length, read from the stacked cache's axis 4: axis 2 of layer 0's K
        if n.op_type == "Shape" and n.input[0] in ("past_text", "past_decoder"):
            n.input[0] = f"past_{n.input[0].split('_')[1]}_k_0"
            for a in n.attribute:
                a.i -= 2
    keep_out = [o for o in g.output if not o.name.startswith("present_")]
    del g.output[:]
    g.output.extend(keep_out + new_out)
    # drop the nodes that fed only the stacked presents (and the layer Gathers)
    prod = {o: n for n in g.node for o in n.output}
    need, stack = set(), [o.name for o in g.output]
    while stack:
        x = stack.pop()
        n = prod.get(x)
        if n is None or id(n) in need:
            continue
        need.add(id(n))
        stack.extend(i for i in n.input if i)
    nodes = [n for n in g.node if id(n) in need]
    del g.node[:]
    g.node.extend(nodes)
    ins = [i for i in g.input if i.name not in ("past_text", "past_decoder")]
    used = {i for n in g.node for i in n.input}
    for p in ("past_text", "past_decoder"):
        if p in used:
            raise SystemExit(f"{src}: {p} is still read after the rewrite")
    del g.input[:]
    g.input.extend(ins + new_in)
    onnx.save(m, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return names


def main() -> None:
    args = step_args(__doc__, "benchmarks/results/cache_layout.json")

    from coca_edge.runtime.bundle import Bundle
    from coca_edge.runtime.runners import OrtRunner

    tmp = tempfile.TemporaryDirectory(prefix="coca-edge-cache-")
    fp32, int8 = fp32_and_int8_bundles(args.preset_model, Path(args.work or tmp.name))
    work = fp32.parent
    graphs = {}
    for label, bundle in (("FP32", fp32), ("INT8", int8)):
        src = Bundle.load(bundle, verify_hashes=False).graph_path("decoder")
        dst = work / f"decoder_per_layer_{label.lower()}.onnx"
        graphs[label] = (src, dst, per_layer(src, dst))

    machine = machine_info()
    print(describe(machine))
    results = {"preset_model": args.preset_model, "past": args.past, "threads": args.threads, "machine": machine,
               "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        feed = _inputs(fp32, b, args.past, args.threads)["decoder"]
        runners, feeds, diffs = {}, {}, {}
        for label, (src, dst, names) in graphs.items():
            per = {k: v for k, v in feed.items() if not k.startswith("past_")}
            for past, layer, kv, name, _ in names:
                per[name] = feed[past][layer, kv]  # a contiguous view: no copy
            shipped, rewritten = OrtRunner(src, threads=args.threads, name=src.name), OrtRunner(dst, threads=args.threads,
                                                                                             name=dst.name)
            a, c = shipped.run(feed), rewritten.run(per)
            present = {"past_text": "present_text", "past_decoder": "present_decoder"}
            diffs[label] = max([float(np.abs(a["logits"] - c["logits"]).max())]
                               + [float(np.abs(a[present[p]][layer, kv] - c[out]).max())
                                  for p, layer, kv, _, out in names])
            runners[f"{label} stacked cache (shipped)"], feeds[f"{label} stacked cache (shipped)"] = shipped, feed
            runners[f"{label} per-layer cache"], feeds[f"{label} per-layer cache"] = rewritten, per
        times = {n: [] for n in runners}
        for n, r in runners.items():
            r.run(feeds[n])  # warm-up
        for _ in range(args.runs):
            for n, r in runners.items():  # interleaved: machine noise hits every variant alike
                t = time.perf_counter()
                r.run(feeds[n])
                times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        base = med["FP32 stacked cache (shipped)"]
        print(f"\nbatch {b}, one step at past {args.past}, medians of {args.runs} interleaved runs")
        for n, v in med.items():
            print(f"  {n:<30}{v:8.2f} ms  {base / v:5.2f}x FP32 shipped")
        for label in graphs:
            print(f"  {label}: per-layer vs stacked {med[label + ' stacked cache (shipped)'] / med[label + ' per-layer cache']:.2f}x,"
                  f" outputs max |diff| {diffs[label]:.1e}")
        results["batches"][str(b)] = {"median_ms": med, "max_abs_diff": diffs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
