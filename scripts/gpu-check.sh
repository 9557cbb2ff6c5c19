#!/usr/bin/env bash
# GPU check of the TensorRT path - run on a machine with an NVIDIA GPU and TensorRT 10.x:
#
#     scripts/gpu-check.sh                 # from the repository root; writes gpu-check/summary.json
#
# The TensorRT path of coca-edge has NOT YET BEEN RUN ON HARDWARE. This script is the check: it
# installs the `gpu` extra, exports test-tiny and coca_ViT-B-32 (random weights), builds TensorRT
# engines for them (`coca-edge build-engine`), compares TensorRT with ONNX Runtime FP32 (embedding
# cosine, caption exact match) and benchmarks the encoders and the decode step (TensorRT engines,
# ORT, and ORT with the IO-binding decode loop when onnxruntime-gpu has CUDA). Budget: < 8 minutes.
# Please send summary.json with the device name (docs/deployment.md says where to record it).
#
# Environment:
#   OUT=dir             output folder (default gpu-check)
#   SKIP_INSTALL=1      use the current environment as is
#   PRESETS="..."       presets to check (default "test-tiny coca_ViT-B-32")
#   PRECISIONS="..."    engine precisions per bundle (default "fp16"; fp32 is added for test-tiny)
#   INT8_BUNDLE=path    also build and measure an INT8 engine from a bundle quantized with the
#                       `tensorrt` preset (TensorRT INT8 needs explicit Q/DQ) - to measure the public
#                       reports that INT8 can be slower than FP16 for ViTs on TensorRT
#   GPU_CHECK_SMOKE=1   no GPU needed: skip TensorRT, compare ORT with its IO-binding loop (CI smoke test)
set -euo pipefail

OUT=${OUT:-gpu-check}
PRESETS=${PRESETS:-"test-tiny coca_ViT-B-32"}
PRECISIONS=${PRECISIONS:-fp16}
PY=${PYTHON:-python}
START=$SECONDS
mkdir -p "$OUT"

log() { printf '[gpu-check %4ss] %s\n' "$((SECONDS - START))" "$*"; }

if [[ "${GPU_CHECK_SMOKE:-0}" != "1" ]]; then
    if ! command -v nvidia-smi >/dev/null && [[ ! -e /etc/nv_tegra_release ]]; then
        echo "gpu-check: no NVIDIA GPU found (nvidia-smi missing, not a Jetson)" >&2
        exit 2
    fi
    if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
        if [[ -e /etc/nv_tegra_release ]]; then
            # Jetson: TensorRT and onnxruntime-gpu come from JetPack / the Jetson wheels, not PyPI
            log "Jetson: installing coca-edge[torch] + cuda-python (TensorRT from JetPack)"
            $PY -m pip install -q -e ".[torch]" "cuda-python>=12.6"
        else
            log "installing coca-edge[gpu] (tensorrt, onnxruntime-gpu, cuda-python)"
            $PY -m pip install -q -e ".[gpu]" --extra-index-url https://pypi.nvidia.com
        fi
    fi
    if ! $PY -c "import tensorrt" 2>/dev/null; then
        echo "gpu-check: 'import tensorrt' fails. Jetson: sudo apt install python3-libnvinfer (JetPack 6); x86: pip install tensorrt --extra-index-url https://pypi.nvidia.com" >&2
        exit 2
    fi
    log "TensorRT $($PY -c 'import tensorrt; print(tensorrt.__version__)'), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo Jetson)"
fi

pairs=()
for preset in $PRESETS; do
    bundle="$OUT/bundles/$preset"
    if [[ ! -f "$bundle/manifest.json" ]]; then
        log "export $preset (random weights)"
        validate=(); [[ "$preset" != "test-tiny" ]] && validate=(--no-validate)  # parity below checks it
        $PY -m coca_edge.cli export "$preset" --out "$bundle" --overwrite "${validate[@]}" >/dev/null
    fi
    precisions="$PRECISIONS"; [[ "$preset" == "test-tiny" ]] && precisions="fp32 $PRECISIONS"
    for precision in $precisions; do
        engines="$OUT/engines/$preset-$precision"
        if [[ "${GPU_CHECK_SMOKE:-0}" != "1" ]]; then
            log "build-engine $preset $precision"
            $PY -m coca_edge.cli build-engine "$bundle" --precision "$precision" --out "$engines" --overwrite \
                --timing-cache "$OUT/engines/timing.cache" --max-batch 8 --num-beams 3 \
                > "$OUT/build-$preset-$precision.log"
        fi
        pairs+=("$bundle=$bundle=$engines=$precision")
    done
done
if [[ -n "${INT8_BUNDLE:-}" && "${GPU_CHECK_SMOKE:-0}" != "1" ]]; then
    log "build-engine INT8 from $INT8_BUNDLE"
    $PY -m coca_edge.cli build-engine "$INT8_BUNDLE" --precision best --out "$OUT/engines/int8" --overwrite \
        --timing-cache "$OUT/engines/timing.cache" > "$OUT/build-int8.log"
    # reference: the FP32 bundle the INT8 one was quantized from, if given
    pairs+=("${INT8_FP32_BUNDLE:-$INT8_BUNDLE}=$INT8_BUNDLE=$OUT/engines/int8=int8")
fi

log "parity and benchmarks"
$PY - "$OUT/summary.json" "${pairs[@]}" <<'PYEOF'
import json, platform, statistics, sys, time
import numpy as np
from coca_edge.runtime.edge import EdgeCoCa

smoke = __import__("os").environ.get("GPU_CHECK_SMOKE") == "1"
summary = {"tensorrt_path": "first hardware run" if not smoke else "smoke (no TensorRT)", "machine": platform.platform(),
           "results": []}
try:
    import tensorrt
    from coca_edge.runtime.trt import device_info
    summary["tensorrt"], summary["gpu"] = tensorrt.__version__, device_info().__dict__
except Exception as err:  # smoke mode, or no TensorRT
    summary["tensorrt"] = f"unavailable: {err}"


def median_ms(fn, repeat=10, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


def cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


for pair in sys.argv[2:]:
    reference_path, bundle_path, engines, precision = pair.split("=")
    import onnxruntime as ort
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    reference = EdgeCoCa.load(reference_path, providers=providers, verify_hashes=False)
    candidate = (EdgeCoCa.load(bundle_path, providers=providers, verify_hashes=False, io_binding=True) if smoke
                 else EdgeCoCa.load(bundle_path, engines=engines, verify_hashes=False))
    size = reference.image_size
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((8, 3, size, size)).astype(np.float32).clip(-2, 2)
    texts = [f"a photo of {w}" for w in ("a dog", "a cat", "two birds", "a red car", "the sea", "a tree",
                                          "a blue cup", "people")]
    row = {"bundle": bundle_path, "engines": engines, "precision": precision, "ort_providers": providers}
    row["image_embed_cosine_min"] = cosine(reference.encode_image(pixels), candidate.encode_image(pixels))
    row["text_embed_cosine_min"] = cosine(reference.encode_text(texts), candidate.encode_text(texts))
    ref_caps = reference.caption_ids(pixels, max_new_tokens=20).sequences
    cand_caps = candidate.caption_ids(pixels, max_new_tokens=20).sequences
    row["greedy_caption_exact_match"] = sum(a == b for a, b in zip(ref_caps, cand_caps)) / len(ref_caps)
    beam_ref = reference.caption_ids(pixels[:2], strategy="beam", num_beams=3, max_new_tokens=12).sequences
    beam_cand = candidate.caption_ids(pixels[:2], strategy="beam", num_beams=3, max_new_tokens=12).sequences
    row["beam_caption_exact_match"] = sum(a == b for a, b in zip(beam_ref, beam_cand)) / len(beam_ref)
    bench = {}
    for name, edge in (("candidate", candidate), ("ort_fp32", reference)):
        for b in (1, 8):
            bench[f"{name}_image_encoder_b{b}_ms"] = median_ms(lambda: edge.encode_image(pixels[:b], batch_size=b))
        bench[f"{name}_text_encoder_b8_ms"] = median_ms(lambda: edge.encode_text(texts))
        cross = edge.cross_kv(pixels[:1])
        steps = 20
        from coca_edge.runtime.generation import GenerationConfig, generate
        config = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps)
        decode = (lambda: edge.io_generator.generate(cross, edge.layout, config)) if edge.io_generator else \
            (lambda: generate(edge.runners["decoder"], cross, edge.layout, config))
        bench[f"{name}_decode_step_b1_ms"] = round(median_ms(decode, repeat=3, warmup=1) / steps, 3)
    if not smoke and cuda:
        bound = EdgeCoCa.load(reference_path, providers=providers, verify_hashes=False, io_binding=True)
        cross = bound.cross_kv(pixels[:1])
        bench["ort_cuda_iobinding_decode_step_b1_ms"] = round(median_ms(
            lambda: bound.io_generator.generate(cross, bound.layout, config), repeat=3, warmup=1) / steps, 3)
    row["benchmarks"] = bench
    summary["results"].append(row)
    print(json.dumps(row, indent=1), flush=True)

with open(sys.argv[1], "w") as f:
    json.dump(summary, f, indent=2)
PYEOF
log "done: $OUT/summary.json"
if (( SECONDS - START > 480 )); then
    echo "gpu-check: took $((SECONDS - START)) s, over the 8-minute budget (report this too)" >&2
fi
