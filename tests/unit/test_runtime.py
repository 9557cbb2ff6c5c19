"""Runtime behaviour on a tiny bundle: torch-free import, bundle verification, input errors, CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from coca_edge.runtime import Bundle, BundleError, EdgeCoCa, GenerationConfig, InputError
from coca_edge.runtime.generation import _pick

BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split('.')[0] in ('torch', 'torchvision', 'open_clip', 'matplotlib'):
                raise ImportError('blocked ' + name, name=name)
    sys.meta_path.insert(0, _Block())
""")


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    path, _ = tiny_bundle
    return shutil.copytree(path, tmp_path / "bundle")


def test_runtime_works_without_torch(tiny_bundle, tmp_path):
    path, model = tiny_bundle
    Image.fromarray(np.zeros((20, 30, 3), np.uint8) + 90).save(tmp_path / "a.png")
    code = BLOCK_TORCH + textwrap.dedent(f"""
        from coca_edge.runtime import EdgeCoCa
        m = EdgeCoCa.load({str(path)!r})
        print(m.caption([{str(tmp_path / 'a.png')!r}], max_new_tokens=4))
        print(m.classify([{str(tmp_path / 'a.png')!r}], ['cat', 'dog'])[0].label)
        import sys; assert 'torch' not in sys.modules
        print('TORCH-FREE OK')
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "TORCH-FREE OK" in result.stdout


def test_manifest_records_what_was_exported(tiny_bundle):
    path, _ = tiny_bundle
    bundle = Bundle.load(path)
    assert bundle.manifest["format_version"] == 1
    assert set(bundle.manifest["graphs"]) == {"image_encoder", "text_encoder", "cross_kv", "decoder"}
    decoder = bundle.manifest["graphs"]["decoder"]
    assert decoder["precision"] == "fp32"
    cache = [f"past_{tower}_{kv}_{i}" for tower in ("text", "decoder") for i in range(2) for kv in "kv"]
    assert [t["name"] for t in decoder["inputs"]] == ["input_ids", *cache, "cross_k_0", "cross_v_0", "cross_k_1",
                                                      "cross_v_1"]
    assert decoder["inputs"][9]["shape"] == ["batch", 2, 15, 32]
    assert decoder["inputs"][1]["shape"] == ["batch", 2, "past", 32]
    assert [t["name"] for t in decoder["outputs"]] == ["logits", *(n.replace("past", "present") for n in cache)]
    assert all(len(f["sha256"]) == 64 for f in bundle.manifest["files"].values())
    assert "tokenizer.json" in bundle.manifest["files"]


def test_missing_file(bundle_copy):
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing file decoder.onnx"):
        EdgeCoCa.load(bundle_copy)


def test_hash_mismatch(bundle_copy):
    data = bytearray((bundle_copy / "text_encoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / "text_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch for text_encoder.onnx"):
        EdgeCoCa.load(bundle_copy)


def test_truncated_file(bundle_copy):
    data = (bundle_copy / "cross_kv.onnx").read_bytes()
    (bundle_copy / "cross_kv.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cross_kv.onnx has .* bytes.*truncated"):
        EdgeCoCa.load(bundle_copy)


def test_unknown_format_version(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown bundle format_version 99"):
        EdgeCoCa.load(bundle_copy)


def test_missing_manifest_and_not_a_directory(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="missing manifest.json"):
        EdgeCoCa.load(bundle_copy)
    with pytest.raises(BundleError, match="not a directory"):
        EdgeCoCa.load(tmp_path / "nothing")


def test_graph_io_not_matching_manifest(bundle_copy):
    # swap two graphs and re-hash: files are intact but the decoder slot holds another graph
    from coca_edge.runtime.bundle import sha256_file

    shutil.copy(bundle_copy / "cross_kv.onnx", bundle_copy / "decoder.onnx")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    path = bundle_copy / "decoder.onnx"
    manifest["files"]["decoder.onnx"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="decoder.onnx: graph IO does not match the manifest"):
        EdgeCoCa.load(bundle_copy, lazy_sessions=False)
    model = EdgeCoCa.load(bundle_copy)  # sessions open on first use: the same error comes then
    with pytest.raises(BundleError, match="decoder.onnx: graph IO does not match the manifest"):
        model.caption([np.zeros((20, 30, 3), np.uint8)], max_new_tokens=3)


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return EdgeCoCa.load(tiny_bundle[0])


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 3, 32, 32), np.float64), "preprocessed float32"),
    (np.zeros((2, 3, 64, 64), np.float32), r"shape \[B, 3, 32, 32\]"),
    (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
    ([], "empty batch"),
    ([np.zeros((20, 20, 4), np.uint8)], "image 0: uint8 arrays must be \\[H, W, 3\\]"),
    ([np.zeros((20, 20), np.uint8)], "image 0: uint8 arrays must be"),
    ([np.zeros((20, 20, 3), np.int32)], "image 0: arrays must be uint8"),
    (["/definitely/missing.png"], "image 0: .*missing.png: no such file"),
    ([42], "image 0: expected a path, PIL image or numpy array, got int"),
])
def test_image_input_errors(runtime, images, match):
    with pytest.raises(InputError, match=match):
        runtime.encode_image(images)


def test_text_input_errors(runtime):
    with pytest.raises(InputError, match="text 1 has 102 tokens .* context length is 76"):
        runtime.encode_text(["fine", "word " * 100])
    assert runtime.encode_text(["word " * 100], truncate=True).shape == (1, 64)
    with pytest.raises(InputError, match="empty batch"):
        runtime.encode_text([])
    with pytest.raises(InputError, match="text 0: expected str, got int"):
        runtime.encode_text([3])
    with pytest.raises(InputError, match="no '\\{\\}' placeholder"):
        runtime.classify(np.zeros((1, 3, 32, 32), np.float32), ["cat"], templates=["a photo"])


def test_mixed_image_inputs_agree(runtime, tmp_path):
    rgb = (np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(48, 40, 3)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    a = runtime.encode_image([str(tmp_path / "x.png"), Image.fromarray(rgb), rgb])
    assert np.allclose(a[0], a[1]) and np.allclose(a[1], a[2])
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)


def test_generation_options(runtime):
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    a = runtime.caption_ids(pixels, strategy="top_p", top_p=0.8, seed=7, max_new_tokens=6).sequences
    b = runtime.caption_ids(pixels, strategy="top_p", top_p=0.8, seed=7, max_new_tokens=6).sequences
    assert a == b and all(len(s) == 6 for s in a)
    batched = runtime.caption_ids(pixels, max_new_tokens=8, batch_size=2).sequences
    single = [runtime.caption_ids(pixels[i:i + 1], max_new_tokens=8).sequences[0] for i in range(2)]
    assert batched == single
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        runtime.caption_ids(pixels, max_new_tokens=80)
    with pytest.raises(ValueError, match="strategy must be one of"):
        GenerationConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="min_new_tokens"):
        GenerationConfig(max_new_tokens=3, min_new_tokens=5)


def test_sampling_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    picks = {int(_pick(logits, GenerationConfig(strategy="top_k", top_k=2), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(_pick(logits, GenerationConfig(strategy="top_p", top_p=0.6), rng)[0]) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 < 0.6, so the second token is needed; 0.8 >= 0.6 stops there
    picks = {int(_pick(logits, GenerationConfig(strategy="top_p", top_p=0.4), rng)[0]) for _ in range(50)}
    assert picks == {0}


def test_cli_caption_and_classify(tiny_bundle, tmp_path, capsys):
    from coca_edge.cli import main

    path, _ = tiny_bundle
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(tmp_path / "w.png")
    assert main(["caption", str(path), str(tmp_path / "w.png"), "--json", "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"].endswith("w.png") and isinstance(out[0]["caption"], str)
    assert main(["classify", str(path), str(tmp_path / "w.png"), "--labels", "cat,dog", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["label"] in ("cat", "dog") and abs(sum(p for _, p in out[0]["top"]) - 1) < 1e-5
    assert main(["caption", str(tmp_path / "nope"), str(tmp_path / "w.png")]) == 2
    assert "bundle not found" in capsys.readouterr().err


def test_cli_export_refuses_to_overwrite(tmp_path, capsys):
    from coca_edge.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert main(["export", "test-tiny", "--out", str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    assert main(["export", "no-such-model", "--out", str(tmp_path / "o2")]) == 2
    assert "not a preset" in capsys.readouterr().err


def test_sessions_stop_spinning_after_each_run(runtime):
    # several sessions run in turn; spinning workers of the last one would take cores from the next
    for name, runner in runtime.runners.items():
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1", name


def test_sessions_open_when_a_task_first_needs_them(tiny_bundle, tmp_path):
    path, _ = tiny_bundle
    model = EdgeCoCa.load(path)
    assert model.runners.opened() == []  # verified and ready, nothing opened yet
    model.caption([np.zeros((20, 30, 3), np.uint8)], max_new_tokens=3)
    assert set(model.runners.opened()) == {"image_encoder", "cross_kv", "decoder"}  # no text encoder
    model.classify([np.zeros((20, 30, 3), np.uint8)], ["cat", "dog"])
    assert "text_encoder" in model.runners.opened()
    eager = EdgeCoCa.load(path, lazy_sessions=False)
    assert set(eager.runners.opened()) == set(Bundle.load(path).manifest["graphs"])
    with pytest.raises(KeyError):
        model.runners["no_such_graph"]


def test_runtime_import_stays_lean():
    # what a captioning process imports: no dataset code, no ftfy (it is loaded on the first encode)
    code = textwrap.dedent("""
        import sys
        from coca_edge.runtime import EdgeCoCa
        heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'ftfy'
                       or m in ('coca_edge.data.synthetic', 'coca_edge.data.tasks', 'coca_edge.data.readers',
                                'coca_edge.data.fashion_mnist', 'coca_edge.data.preview'))
        print(heavy)
        from coca_edge.data import SyntheticScenes, score_captions   # lazily resolved names still import
        from coca_edge.tokenizer import Tokenizer
        Tokenizer().encode('a red cube')
        print('ftfy' in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_data_package_names_are_the_objects_not_submodules():
    code = "import coca_edge.runtime, coca_edge.data as d; print(callable(d.preprocess), callable(d.score_captions))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
