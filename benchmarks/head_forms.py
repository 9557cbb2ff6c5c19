"""The decoder's vocabulary head alone in each form the quantizer can give it (not a test).

    python benchmarks/head_forms.py                 # coca_ViT-B-32's head: [M, 512] x [512, 49408]
    python benchmarks/head_forms.py --vocab 4096    # smaller, to smoke-test

Random weights (std 0.02), ORT CPU: FP32 ``MatMul``, per-tensor dynamic INT8
(``DynamicQuantizeMatMul``, what ``keep_logits=False`` gives) and ``MatMulNBits`` at 8 and 4 bits
(block 32, accuracy levels 0 and 4; 8 bits / level 4 is the ``cpu`` preset's head). Medians of
interleaved runs at M = 1 and 8 rows (batch 1 and 8 decode steps), with cosine and argmax
agreement vs FP32, and the arithmetic rate and weight bandwidth each reaches: ``--vocab 2048``
is the shape of a B-32 decoder MLP layer, which tells whether a batch-8 step's weight
products are bound by memory (fewer bytes help) or by arithmetic (they do not). Speed only:
which head keeps captions is measured on trained models (docs/quantization.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, machine_info  # noqa: E402


def _fp32_head(width: int, vocab: int, path: Path, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    weight = (np.random.default_rng(seed).standard_normal((width, vocab)) * 0.02).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"])], "head",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["m", width])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["m", vocab])],
                          [nh.from_array(weight, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=49408)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    tmp = Path(tempfile.mkdtemp(prefix="coca-edge-head-"))
    paths = {"FP32 MatMul": tmp / "fp32.onnx", "INT8 per-tensor dynamic": tmp / "dynamic.onnx"}
    _fp32_head(args.width, args.vocab, paths["FP32 MatMul"])
    quantize_dynamic(str(paths["FP32 MatMul"]), str(paths["INT8 per-tensor dynamic"]), weight_type=QuantType.QInt8)
    for bits in (8, 4):
        for level in (4, 0):
            cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=level, bits=bits)
            quantizer = MatMulNBitsQuantizer(onnx.load(str(paths["FP32 MatMul"])), algo_config=cfg)
            quantizer.process()
            path = tmp / f"nbits{bits}_{level}.onnx"
            quantizer.model.save_model_to_file(str(path), False)
            paths[f"MatMulNBits {bits}-bit, level {level}"] = path
    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sessions run in turn
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    print(describe(machine_info()))
    print(f"head [M, {args.width}] x [{args.width}, {args.vocab}], {args.threads} threads, "
          f"medians of {args.runs} interleaved runs")
    rng = np.random.default_rng(1)
    for m in (int(r) for r in args.rows.split(",")):
        x = rng.standard_normal((m, args.width)).astype(np.float32)
        outs = {n: s.run(None, {"x": x})[0] for n, s in sessions.items()}  # warm-up
        ref = outs["FP32 MatMul"]
        times = {n: [] for n in sessions}
        for _ in range(args.runs):
            for n, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[n].append(time.perf_counter() - t)
        print(f"\nM = {m}")
        base = statistics.median(times["FP32 MatMul"])
        for n, y in outs.items():
            med = statistics.median(times[n])
            cos = float((y * ref).sum() / (np.linalg.norm(y) * np.linalg.norm(ref)))
            agree = float((y.argmax(-1) == ref.argmax(-1)).mean())
            weight_mb = paths[n].stat().st_size / 1e6
            gops = 2 * m * args.width * args.vocab / med / 1e9
            print(f"  {n:<28}{med * 1e3:8.2f} ms  {base / med:5.2f}x FP32  {gops:6.1f} GOP/s  "
                  f"{weight_mb / 1e3 / med:5.1f} GB/s of weights  cosine {cos:.6f}  argmax agree {agree:.2f}")


if __name__ == "__main__":
    main()
