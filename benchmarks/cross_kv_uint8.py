"""Would a uint8 cross-attention K/V cache make the INT8 decode step faster? (not a test)

    python benchmarks/cross_kv_uint8.py                       # coca_ViT-B-32, random weights
    python benchmarks/cross_kv_uint8.py --work DIR            # keep / reuse the bundles in DIR

At batch 8 the image's cross-attention K/V is 100 MB a step in FP32 (12 layers x K, V x
8 x 8 heads x 255 tokens x 64), more than the INT8 step's weights, and
``decode_levers.py --sections cross`` measured that attention alone 1.60x faster with
uint8 K/V through ``MatMulInteger``. This measures the whole step: the shipped INT8 decoder
(``cpu`` preset, dynamic) against the same graph with every cross-attention MatMul rewritten
to ``DynamicQuantizeLinear`` (the query, or the softmax output) + ``MatMulInteger`` with the
uint8 K or V (one scale / zero point per layer's K and V, per tensor) + ``Cast`` + scale,
and the FP32 decoder; one step at past 15, medians of interleaved runs, same weights, same
feeds. The rewritten graph is an experiment: it is not what ``coca-edge quantize`` writes.
Results go to ``benchmarks/results/cross_kv_uint8.json``.
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
from decode_levers import quantize_u8  # noqa: E402
from machine import describe, machine_info  # noqa: E402
from step_bench import fp32_and_int8_bundles, step_args  # noqa: E402
from quantize import _inputs  # noqa: E402  (same real feeds as benchmarks/quantize.py)


def uint8_cross_decoder(decoder: Path, out: Path) -> tuple[Path, list[str]]:
    """``decoder`` with its ``cross_k_i`` / ``cross_v_i`` inputs uint8 (plus ``<name>_scale``
    float and ``<name>_zero`` uint8 scalars) and the MatMuls reading them integer."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh

    model = onnx.load(str(decoder))
    graph = model.graph
    cross = {i.name for i in graph.input if i.name.startswith(("cross_k_", "cross_v_"))}
    nodes, rewritten = [], 0
    for node in graph.node:
        reads = [x for x in node.input if x in cross]
        if not reads or node.op_type == "Shape":
            nodes.append(node)
            continue
        if node.op_type != "MatMul":
            raise SystemExit(f"{decoder}: {node.op_type} {node.name} reads {reads}; only MatMul and Shape are rewritten")
        kv = reads[0]
        act = node.input[1] if node.input[0] == kv else node.input[0]
        y = node.output[0]
        pair = [kv, y + "_q"] if node.input[0] == kv else [y + "_q", kv]
        zeros = [kv + "_zero", y + "_z"] if node.input[0] == kv else [y + "_z", kv + "_zero"]
        nodes += [oh.make_node("DynamicQuantizeLinear", [act], [y + "_q", y + "_s", y + "_z"]),
                  oh.make_node("MatMulInteger", [*pair, *zeros], [y + "_i"]),
                  oh.make_node("Cast", [y + "_i"], [y + "_f"], to=TP.FLOAT),
                  oh.make_node("Mul", [y + "_s", kv + "_scale"], [y + "_m"]),
                  oh.make_node("Mul", [y + "_f", y + "_m"], [y])]
        rewritten += 1
    if rewritten != len(cross):
        raise SystemExit(f"{decoder}: rewrote {rewritten} MatMuls for {len(cross)} cross inputs")
    extra = []
    for inp in graph.input:
        if inp.name in cross:
            inp.type.tensor_type.elem_type = TP.UINT8
            extra += [oh.make_tensor_value_info(inp.name + "_scale", TP.FLOAT, []),
                      oh.make_tensor_value_info(inp.name + "_zero", TP.UINT8, [])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(extra)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out, sorted(cross)


def main() -> None:
    args = step_args(__doc__, "benchmarks/results/cross_kv_uint8.json")

    from coca_edge.runtime.bundle import Bundle
    from coca_edge.runtime.runners import OrtRunner

    tmp = tempfile.TemporaryDirectory(prefix="coca-edge-u8cross-")
    fp32, int8 = fp32_and_int8_bundles(args.preset_model, Path(args.work or tmp.name))
    work = fp32.parent
    dec8 = Bundle.load(int8, verify_hashes=False).graph_path("decoder")
    u8_path, cross = uint8_cross_decoder(dec8, work / "decoder_u8cross.onnx")

    names = ("FP32", "INT8 (shipped)", "INT8 + uint8 cross K/V")
    paths = (Bundle.load(fp32, verify_hashes=False).graph_path("decoder"), dec8, u8_path)
    runners = {n: OrtRunner(p, threads=args.threads, name=n) for n, p in zip(names, paths)}
    results = {"preset_model": args.preset_model, "past": args.past, "threads": args.threads,
               "machine": machine_info(), "batches": {}}
    print(describe(results["machine"]))
    for b in (int(x) for x in args.batches.split(",")):
        feed = _inputs(fp32, b, args.past, args.threads)["decoder"]
        u8 = {k: v for k, v in feed.items() if k not in cross}
        for name in cross:
            u8[name], u8[name + "_scale"], u8[name + "_zero"] = quantize_u8(feed[name])
        feeds = dict(zip(names, (feed, feed, u8)))
        ref = runners[names[1]].run(feed)["logits"].reshape(b, -1)
        got = runners[names[2]].run(u8)["logits"].reshape(b, -1)
        cos = float(((got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)).min())
        argmax = float((got.argmax(1) == ref.argmax(1)).mean())
        times = {n: [] for n in names}
        for n in names:
            runners[n].run(feeds[n])  # warm-up
        for _ in range(args.runs):
            for n in names:  # interleaved: machine noise hits every variant alike
                t = time.perf_counter()
                runners[n].run(feeds[n])
                times[n].append(time.perf_counter() - t)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        print(f"\nbatch {b}, one step at past {args.past}, medians of {args.runs} interleaved runs")
        for n in names:
            print(f"  {n:<26}{med[n]:8.2f} ms  {med['FP32'] / med[n]:5.2f}x FP32  {med[names[1]] / med[n]:5.2f}x INT8")
        print(f"  uint8 cross K/V vs shipped INT8 logits: cosine min {cos:.6f}, argmax equal {argmax:.3f}")
        results["batches"][str(b)] = {"median_ms": med, "logits_cosine_min_vs_int8": cos,
                                      "argmax_equal_vs_int8": argmax}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
