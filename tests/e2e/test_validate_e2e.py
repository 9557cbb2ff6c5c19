"""`coca-edge validate` end to end on the test-tiny bundle: zero drift for an identical candidate,
a decoder with noisy weights fails the right gates and is localised, bad input exits 2, and the
HTML report's structure."""
from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from coca_edge.cli import main
from coca_edge.runtime.bundle import write_manifest

SAMPLES = "12"  # per task: enough for every task to have samples, small enough for seconds per run
FAST = ["--samples", SAMPLES, "--max-new-tokens", "6", "--tensor-samples", "8", "--no-latency"]


def _rewrite_manifest(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    extra = {k: v for k, v in manifest.items()
             if k not in ("format", "format_version", "coca_edge_version", "source_model", "graphs", "files")}
    write_manifest(bundle, manifest["graphs"], manifest["source_model"], manifest["coca_edge_version"], extra)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def noisy_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with Gaussian noise (0.5 std) on every 2-D weight of decoder.onnx only."""
    import onnx
    from onnx import numpy_helper

    path = _copy(tiny_bundle[0], tmp_path_factory.mktemp("noisy") / "noisy")
    model = onnx.load(str(path / "decoder.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2 and w.size >= 1024:
            noisy = w + rng.normal(0, 0.5 * w.std(), w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(path / "decoder.onnx"))
    _rewrite_manifest(path)
    return path


@pytest.fixture(scope="module")
def noisy_run(tiny_bundle, noisy_bundle, tmp_path_factory):
    """One CLI run: reference = tiny bundle, candidates = itself and the noisy bundle."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("noisy-report") / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["validate", "--reference", str(tiny_bundle[0]), "--candidate", str(tiny_bundle[0]),
                     "--candidate", str(noisy_bundle), "--gates", "cpu-int8", "--localize", "4", "--out", str(out),
                     *FAST])
    return code, stdout.getvalue(), out


def test_identical_candidate_has_zero_drift_and_passes_every_gate(tiny_bundle, tmp_path, capsys):
    gates = tmp_path / "strict.yaml"
    gates.write_text("gates:\n"
                     "  zero_shot_top1_drop: '<= 0'\n  retrieval_R@1_drop: '<= 0'\n"
                     "  zero_shot_top1_agreement: '>= 1'\n  caption_exact_match: '>= 1'\n"
                     "  caption_token_agreement: '>= 1'\n  embed_cosine_min: '>= 0.999999'\n"
                     "  decoder.logits.top1_agreement: '>= 1'\n  decoder.logits.max_abs: '<= 0'\n"
                     "  decoder.present_decoder.max_abs: '<= 0'\n  image_encoder.image_tokens.max_abs: '<= 0'\n"
                     "  text_encoder.text_embed.max_abs: '<= 0'\n  cross_kv.cross_kv.max_abs: '<= 0'\n")
    out = tmp_path / "report"
    code = main(["validate", "--reference", str(tiny_bundle[0]), "--candidate", str(tiny_bundle[0]),
                 "--label", "same bundle", "--gates", str(gates), "--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "PASS" in printed and "FAIL" not in printed
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    cand = report["candidates"][0]
    assert cand["label"] == "same bundle" and "same bundle" in printed
    assert main(["validate", "--reference", str(tiny_bundle[0]), "--candidate", str(tiny_bundle[0]),
                 "--label", "a", "--label", "b", *FAST]) == 2
    assert "2 --label for 1 --candidate" in capsys.readouterr().err
    assert len(cand["gates"]) == 12 and all(g["passed"] for g in cand["gates"])
    assert cand["metrics"]["image_encoder.image_embed.sqnr_db"] == "inf"  # JSON has no inf: written as a string
    assert cand["metrics"]["first_divergence_mean"] > 0


def test_noisy_decoder_fails_the_decoder_gates_and_is_localised(noisy_run):
    code, printed, out = noisy_run
    assert code == 1
    fails = [line for line in printed.splitlines() if line.startswith("FAIL")]
    noisy_fails = [line for line in fails if "noisy" in line]
    assert any("caption_exact_match" in line for line in noisy_fails)
    assert any("decoder.logits.top1_agreement" in line for line in noisy_fails)
    # the encoders are untouched: embeddings and zero-shot stay exact
    assert not any(g in line for line in noisy_fails for g in ("embed_cosine_min", "zero_shot_top1_drop",
                                                               "retrieval_R@1_drop"))
    report = json.loads((out / "report.json").read_text())
    ident, noisy = report["candidates"]
    assert noisy["metrics"]["decoder.logits.sqnr_db"] < 20  # 0.5-std weight noise: measured ~-1 dB
    assert noisy["metrics"]["image_encoder.image_embed.sqnr_db"] == "inf"
    assert noisy["localization"] and {d["graph"] for d in noisy["localization"]} == {"decoder"}
    assert ident["localization"] == []  # same files: nothing to localise
    # test-tiny's random captions name no scene objects, so the hallucination gate cannot be evaluated
    # for either candidate: it fails closed instead of passing
    for cand in (ident, noisy):
        gate = next(g for g in cand["gates"] if g["name"] == "hallucination_rate_increase")
        assert not gate["passed"] and gate["reason"].startswith("not evaluated")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_report_structure(noisy_run):
    _, _, out = noisy_run
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    parser = _Collect()
    parser.feed(text)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert imgs and all(a["src"].startswith("data:image/png;base64,") for a in imgs)  # self-contained
    assert not [a for t, a in parser.tags if t in ("script", "link")]
    plots = {a["alt"] for a in imgs if "plot" in a.get("class", "")}
    assert {"cosine", "recall", "divergence", "acc_latency", "acc_size"} <= plots
    assert sum(1 for t, a in parser.tags if t == "h2" and a.get("class") == "candidate") == 2
    assert sum(1 for t, a in parser.tags if t == "table" and a.get("class") == "gates") == 2
    cards = [a for t, a in parser.tags if t == "div" and a.get("class") == "card"]
    assert cards and len(cards) <= 12  # the noisy decoder's differing captions, capped
    assert (out / "report.md").read_text().startswith("# Validation report: FAILED")


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_bundle, tmp_path_factory):
    """The tiny bundle's PyTorch model as a coca-edge checkpoint (model.safetensors + config.json)."""
    from safetensors.torch import save_file

    model = tiny_bundle[1]
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(model.config.to_json())
    return ckpt / "model.safetensors"


def test_torch_reference_vs_bundle_and_fp16(tiny_bundle, tiny_checkpoint):
    """A PyTorch checkpoint as the reference: the FP32 bundle differs by ORT rounding only, the same
    checkpoint run @fp16 by real FP16 rounding."""
    from coca_edge.validate import validate

    path = tiny_bundle[0]
    report = validate(tiny_checkpoint, [path, f"{tiny_checkpoint}@fp16"], samples=8,
                      max_new_tokens=6, tensor_samples=8, latency=False, progress=False, labels=["onnx", "fp16"])
    assert [r.name for r in report.results] == ["onnx", "fp16"]
    onnx_m, fp16_m = report.results[0].metrics, report.results[1].metrics
    assert report.reference.info["kind"] == "torch" and report.results[0].info["kind"] == "onnx"
    # export tolerances (exporters/specs.py): embeddings 5e-5, logits 1e-4
    assert onnx_m["image_encoder.image_embed.max_abs"] < 5e-5
    assert onnx_m["decoder.logits.max_abs"] < 1e-4
    assert onnx_m["zero_shot_top1_drop"] == 0 and onnx_m["zero_shot_top1_agreement"] == 1
    assert 0 < fp16_m["image_encoder.image_embed.max_abs"]  # real FP16 math, not a cast-back emulation
    assert fp16_m["embed_cosine_min"] > 0.99  # FP16 keeps 11 significant bits
    assert report.results[1].info["precision"] == "fp16"


@pytest.mark.parametrize("device, expect", [("gpu0", "not a torch device"), ("meta", "run on cpu or cuda, not meta"),
                                            ("cuda", "sees no CUDA device")])
def test_bad_device_for_a_checkpoint_exits_2(device, expect, tiny_checkpoint, capsys):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code = main(["validate", "--reference", str(tiny_checkpoint), "--candidate", f"{tiny_checkpoint}@fp16",
                 "--device", device, *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: device {device!r}" in err and expect in err and "Traceback" not in err


def test_device_is_recorded_and_unused_for_bundles(tiny_bundle, tiny_checkpoint):
    """A checkpoint's device is in its info; --device with bundles alone is noted as unused (and needs
    no CUDA: bundles run on ONNX Runtime)."""
    from coca_edge.validate import validate

    report = validate(tiny_checkpoint, [f"{tiny_checkpoint}@fp16"], samples=4, max_new_tokens=4, tensor_samples=4,
                      latency=False, progress=False)
    assert report.reference.info["device"] == "cpu" and report.results[0].info["device"] == "cpu"
    assert "device" not in report.data
    bundles = validate(tiny_bundle[0], [tiny_bundle[0]], samples=4, max_new_tokens=4, tensor_samples=4,
                       latency=False, progress=False, device="cuda:3")
    assert "device" not in bundles.results[0].info
    assert any("device cuda:3 unused" in n for n in bundles.notes)


def test_fp32_on_cuda_turns_tf32_off_and_restores_it():
    """cuDNN convolutions default to TF32; a CUDA "FP32" reference must not use it, and the process's
    own settings come back afterwards (the flags are plain settings, so this runs without a GPU)."""
    import types

    import torch

    from coca_edge.validate.models import _fp32_means_fp32

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with _fp32_means_fp32(types.SimpleNamespace(type="cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with _fp32_means_fp32(types.SimpleNamespace(type="cpu")):
            assert torch.backends.cudnn.allow_tf32  # CPU runs leave the settings alone
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cuda_fp32_matches_cpu_and_fp16_runs_on_the_gpu(tiny_checkpoint):
    """On a machine with CUDA (never CI's): the checkpoint on the GPU in FP32 gives the CPU's
    numbers up to summation order, and @fp16 / @bf16 run there as real reduced-precision math."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from coca_edge.validate import Validator, open_model

    validator = Validator(open_model(tiny_checkpoint, device="cpu"), samples=8, max_new_tokens=6,
                          tensor_samples=8, progress=False)
    fp32 = validator.evaluate(open_model(tiny_checkpoint, device="cuda"), latency=False)
    assert fp32.info["device"] == "cuda"
    # FP32 on another device: summation order only (the export tolerances: embeddings 5e-5, logits 1e-4)
    assert fp32.metrics["image_encoder.image_embed.max_abs"] < 5e-5
    assert fp32.metrics["decoder.logits.max_abs"] < 1e-4
    assert fp32.metrics["caption_exact_match"] == 1
    for dtype in ("fp16", "bf16"):
        half = validator.evaluate(open_model(f"{tiny_checkpoint}@{dtype}", device="cuda"), latency=False)
        assert half.info["precision"] == dtype
        assert 0 < half.metrics["image_encoder.image_embed.max_abs"]
        assert half.metrics["embed_cosine_min"] > 0.99


@pytest.mark.parametrize("case", ["architecture", "tokenizer", "empty-data", "corrupted", "gates-key", "missing"])
def test_bad_input_exits_2_with_a_clear_error(case, tiny_bundle, tmp_path, capsys):
    ref = tiny_bundle[0]
    cand = ref
    args: list[str] = []
    expect = ""
    if case == "architecture":
        cand = _copy(ref, tmp_path / "other")
        cfg = json.loads((cand / "config.json").read_text())
        cfg["model"]["text"]["layers"] += 1
        (cand / "config.json").write_text(json.dumps(cfg))
        _rewrite_manifest(cand)
        expect = "architecture differs"
    elif case == "tokenizer":
        cand = _copy(ref, tmp_path / "other")
        tok = json.loads((cand / "tokenizer.json").read_text())
        tok["context_length"] = 32
        (cand / "tokenizer.json").write_text(json.dumps(tok))
        _rewrite_manifest(cand)
        expect = "tokenizer differs"
    elif case == "empty-data":
        (tmp_path / "empty.tsv").write_text("filepath\ttitle\n")
        args = ["--data", str(tmp_path / "empty.tsv")]
        expect = "empty"
    elif case == "corrupted":
        cand = _copy(ref, tmp_path / "corrupt")
        data = bytearray((cand / "decoder.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (cand / "decoder.onnx").write_bytes(bytes(data))
        expect = "sha256 mismatch for decoder.onnx"
    elif case == "gates-key":
        (tmp_path / "g.yaml").write_text("gates:\n  caption_exact: '>= 0.9'\n")
        args = ["--gates", str(tmp_path / "g.yaml")]
        expect = "caption_exact"
    elif case == "missing":
        cand = tmp_path / "nope"
        expect = "no such bundle directory or checkpoint"
    code = main(["validate", "--reference", str(ref), "--candidate", str(cand), *args, *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and expect in err


def test_user_data_skips_tasks_it_cannot_support_with_a_note(tiny_bundle, tmp_path):
    """An image folder has labels but no captions; a CSV has captions but no labels."""
    from PIL import Image

    from coca_edge.validate import Validator

    rng = np.random.default_rng(0)
    rows = ["filepath,title"]
    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
            img.save(tmp_path / "folder" / label / f"{i}.png")
            rows.append(f"folder/{label}/{i}.png,a photo of a {label} number {i}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")

    folder = Validator(tiny_bundle[0], data=str(tmp_path / "folder"), samples=4, max_new_tokens=4, progress=False)
    result = folder.evaluate(tiny_bundle[0], latency=False)
    assert len(folder.data.pixels) == 4  # --samples caps the data
    assert "zero_shot_top1" in result.metrics and "retrieval_R@1" not in result.metrics
    assert "bleu4" not in result.metrics and result.metrics["caption_exact_match"] == 1.0
    assert any("retrieval" in n and "skipped" in n for n in folder.data.notes)

    csv = Validator(tiny_bundle[0], data=str(tmp_path / "data.csv"), samples=6, max_new_tokens=4, progress=False)
    result = csv.evaluate(tiny_bundle[0], latency=False)
    assert result.metrics["retrieval_R@1_drop"] == 0 and "bleu4" in result.metrics
    assert "zero_shot_top1" not in result.metrics and "hallucination_rate" not in result.metrics
    assert any("zero-shot tasks are skipped" in n for n in csv.data.notes)


def test_bundles_validate_without_torch(tiny_bundle, noisy_bundle):
    """Bundle-vs-bundle validation and localisation need no torch (a device can check its own bundles)."""
    import subprocess
    import sys

    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked", name=name)
sys.meta_path.insert(0, Block())
from coca_edge.validate import Validator
v = Validator({str(tiny_bundle[0])!r}, samples=4, max_new_tokens=4, progress=False)
r = v.evaluate({str(noisy_bundle)!r}, latency=False)
drifts, _ = v.localize({str(noisy_bundle)!r}, top_k=2)
assert "bleu4" in r.metrics and drifts[0].graph == "decoder"
assert "torch" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
