"""Runtime memory options, the zero-copy weight reader, the verified-hash cache and device-path errors."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from coca_edge.runtime import Bundle, BundleError, EdgeCoCa, MemoryConfig
from coca_edge.runtime import bundle as bundle_module
from coca_edge.runtime import edge as edge_module
from coca_edge.runtime.bundle import required_onnxruntime, write_manifest
from coca_edge.runtime.runners import OrtRunner
from coca_edge.runtime.weights import read_initializers, share_initializers

GRAPHS = ("image_encoder", "text_encoder", "cross_kv", "decoder")


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle[0], tmp_path / "bundle")


def _rewrite_manifest(root, edit=None):
    manifest = json.loads((root / "manifest.json").read_text())
    graphs = manifest["graphs"]
    if edit:
        edit(graphs)
    extra = {k: v for k, v in manifest.items()
             if k not in ("format", "format_version", "coca_edge_version", "source_model", "graphs", "files",
                          "validated_with")}
    write_manifest(root, graphs, manifest["source_model"], manifest["coca_edge_version"], extra=extra)


@pytest.fixture()
def external_bundle(bundle_copy):
    """The tiny bundle with every weight in `<graph>.onnx.data` (ONNX external data)."""
    for name in GRAPHS:
        path = bundle_copy / f"{name}.onnx"
        onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location=f"{name}.onnx.data",
                        size_threshold=1024)

    def add_data_files(graphs):
        for name, graph in graphs.items():
            graph["data_files"] = [f"{name}.onnx.data"]

    _rewrite_manifest(bundle_copy, add_data_files)
    return bundle_copy


def test_weight_reader_matches_onnx(tiny_bundle, external_bundle):
    for root in (tiny_bundle[0], external_bundle):
        path = root / "decoder.onnx"
        ours = {i.name: i for i in read_initializers(path, min_bytes=0)}
        ref = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        assert ours, "the reader found no initializers"
        for name, init in ours.items():
            assert init.array.dtype == ref[name].dtype and np.array_equal(init.array, ref[name]), name
            assert not init.array.flags.writeable  # a view of the read-only mapping, not a copy
        if root == external_bundle:
            assert all(i.external for i in ours.values() if i.array.nbytes >= 1024)  # onnx's size_threshold
            # onnx aligns large external tensors, so every weight is a view (small shape constants
            # may be stored elsewhere and are left to ORT)
            assert set(ours) >= {n for n, a in ref.items() if a.nbytes >= 4096}


def test_shared_weights_are_one_array(external_bundle):
    shared = share_initializers({g: external_bundle / f"{g}.onnx" for g in GRAPHS})
    text = {id(a) for _, a in shared["text_encoder"]}
    decoder = {id(a) for _, a in shared["decoder"]}
    common = text & decoder
    # The text tower sits in both graphs: at least its token embedding (vocab x width floats) is
    # handed to both sessions as one array.
    text_cfg = json.loads((external_bundle / "config.json").read_text())["model"]["text"]
    sizes = {id(a): a.nbytes for _, a in shared["text_encoder"]}
    assert sum(sizes[i] for i in common) >= text_cfg["vocab_size"] * text_cfg["width"] * 4


def test_memory_presets_give_identical_tokens(tiny_bundle, external_bundle):
    images = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    reference = EdgeCoCa.load(tiny_bundle[0]).caption_ids(images, max_new_tokens=6).sequences
    for root in (tiny_bundle[0], external_bundle):
        for memory in ("default", "lean", "low", MemoryConfig(prepacking=False)):
            model = EdgeCoCa.load(root, memory=memory)
            assert model.caption_ids(images, max_new_tokens=6).sequences == reference, (root, memory)
            emb = model.encode_text(["a red square"])
            assert np.allclose(np.linalg.norm(emb, axis=-1), 1, atol=1e-5)


def test_low_memory_sessions_use_the_shared_arrays(external_bundle):
    model = EdgeCoCa.load(external_bundle, memory="low")
    text = {n: v.data_ptr() for n, v in model.runners["text_encoder"]._initializers}
    decoder = {n: v.data_ptr() for n, v in model.runners["decoder"]._initializers}
    assert text and decoder
    assert set(text.values()) & set(decoder.values())  # the same buffer handed to both sessions


def test_memory_config_validation():
    with pytest.raises(ValueError, match="memory must be one of"):
        EdgeCoCa.load("unused", memory="tiny")
    with pytest.raises(ValueError, match="share_weights=True. needs prepacking=False"):
        MemoryConfig(share_weights=True)
    with pytest.raises(TypeError, match="arena must be a bool"):
        MemoryConfig(arena=1)


def test_hash_cache_skips_unchanged_files_and_catches_changed_ones(bundle_copy, monkeypatch):
    Bundle.load(bundle_copy)  # fills the cache
    hashed = []
    real = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda p, *a: hashed.append(p.name) or real(p, *a))
    Bundle.load(bundle_copy)
    assert hashed == []
    data = bytearray((bundle_copy / "cross_kv.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / "cross_kv.onnx").write_bytes(bytes(data))  # same size: only the hash can tell
    with pytest.raises(BundleError, match="sha256 mismatch for cross_kv.onnx"):
        Bundle.load(bundle_copy)
    assert hashed == ["cross_kv.onnx"]
    hashed.clear()
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.load(bundle_copy, hash_cache=False)
    assert len(hashed) == len(json.loads((bundle_copy / "manifest.json").read_text())["files"])


def test_newer_bundle_format_is_refused_with_the_version_it_needs(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest.update(format_version=3, coca_edge_version="9.0.0")
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"written by coca-edge 9\.0\.0 and needs a coca-edge that reads format "
                                          r"version 3.*upgrade coca-edge"):
        Bundle.load(bundle_copy)


def test_manifest_records_what_ort_must_implement(tiny_bundle):
    manifest = Bundle.load(tiny_bundle[0]).manifest
    for graph in manifest["graphs"].values():
        assert graph["opset_imports"]["ai.onnx"] == graph["opset"]
        assert graph["contrib_ops"] == []
    assert manifest["validated_with"]["onnxruntime"]
    # opset 20 first shipped in onnxruntime 1.17 (ORT's compatibility matrix)
    assert required_onnxruntime(manifest["graphs"]["decoder"]) == ("1.17", ["ONNX opset 20"])
    assert required_onnxruntime({"opset_imports": {"ai.onnx": 17}, "contrib_ops": ["MatMulNBits"]}) == \
        ("1.17", ["contrib op MatMulNBits"])


def test_old_onnxruntime_is_told_the_version_it_needs(bundle_copy, monkeypatch):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["graphs"]["decoder"]["contrib_ops"] = ["GatherBlockQuantized"]  # int4 embeddings
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(edge_module, "onnxruntime_version", lambda: "1.19.2")
    with pytest.raises(BundleError, match=r"graph decoder needs onnxruntime >= 1\.20 \(contrib op GatherBlockQuantized\); "
                                          r"this is onnxruntime 1\.19\.2; the bundle was validated with onnxruntime"):
        EdgeCoCa.load(bundle_copy)
    monkeypatch.setattr(edge_module, "onnxruntime_version", lambda: "1.12.0")
    with pytest.raises(BundleError, match=r"graph image_encoder needs onnxruntime >= 1\.17 \(ONNX opset 20\)"):
        EdgeCoCa.load(bundle_copy)
    monkeypatch.setattr(edge_module, "onnxruntime_version", lambda: "1.20.0")
    assert EdgeCoCa.load(bundle_copy).caption_ids(np.zeros((1, 3, 32, 32), np.float32), max_new_tokens=2)


def _tiny_graph(path, opset: int, op: str = "Relu", domain: str = ""):
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_ort_refusing_a_graph_names_what_it_needs(tmp_path):
    # An opset no ONNX Runtime implements yet: ORT's own refusal is turned into the version needed.
    with pytest.raises(BundleError, match=r"uses ai\.onnx opset 1000, but onnxruntime [\d.]+ runs up to opset \d+; "
                                          r"it needs onnxruntime >= 9\.9"):
        OrtRunner(_tiny_graph(tmp_path / "new.onnx", 1000), requirement="onnxruntime >= 9.9")
    with pytest.raises(BundleError, match=r"no kernel for operator 'NotAnOrtOp' .*needs a newer onnxruntime"):
        OrtRunner(_tiny_graph(tmp_path / "op.onnx", 20, "NotAnOrtOp", "com.microsoft"),
                  requirement="a newer onnxruntime")


def test_cli_memory_option(external_bundle, tmp_path, capsys):
    from PIL import Image

    from coca_edge.cli import main

    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "a.png")
    assert main(["caption", str(external_bundle), str(tmp_path / "a.png"), "--memory", "default", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["caption", str(external_bundle), str(tmp_path / "a.png"), "--memory", "low", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == default


def _tokens(model: EdgeCoCa) -> np.ndarray:
    pixels = np.random.default_rng(0).standard_normal((2, 3, model.image_size, model.image_size)).astype(np.float32)
    return np.array(model.caption_ids(pixels, max_new_tokens=6).sequences)


def test_optimized_graph_cache_reopens_from_the_saved_graphs(bundle_copy, tmp_path):
    cache = tmp_path / "optimized"
    plain = EdgeCoCa.load(bundle_copy, optimized_cache=False)
    first = EdgeCoCa.load(bundle_copy, optimized_cache=cache)
    assert all(r.opened_from == bundle_copy / f"{g}.onnx" for g, r in first.runners.items())  # wrote the entries
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == len(GRAPHS) and not any(e.startswith(".") for e in entries)  # no staging left
    second = EdgeCoCa.load(bundle_copy, optimized_cache=cache)
    for g, r in second.runners.items():
        assert r.opened_from.parent.parent == cache and r.opened_from.name == f"{g}.onnx"
    assert (_tokens(plain) == _tokens(first)).all() and (_tokens(plain) == _tokens(second)).all()


def test_optimized_graph_cache_ignores_changed_entries_and_changed_bundles(bundle_copy, tmp_path):
    cache = tmp_path / "optimized"
    EdgeCoCa.load(bundle_copy, optimized_cache=cache).runners["decoder"]  # opens (and caches) it
    entry = next(p for p in cache.iterdir() if p.name.startswith("decoder-"))
    with open(entry / "decoder.onnx", "ab") as f:  # a damaged cached graph
        f.write(b"\0")
    again = EdgeCoCa.load(bundle_copy, optimized_cache=cache)
    assert again.runners["decoder"].opened_from == bundle_copy / "decoder.onnx"  # rebuilt, not used
    assert EdgeCoCa.load(bundle_copy, optimized_cache=cache).runners["decoder"].opened_from.parent.parent == cache
    # a re-exported (here: touched) graph never meets the entry of its old file
    (bundle_copy / "decoder.onnx.data").touch()
    _rewrite_manifest(bundle_copy)
    assert EdgeCoCa.load(bundle_copy, optimized_cache=cache).runners["decoder"].opened_from == \
        bundle_copy / "decoder.onnx"


def test_optimized_graph_cache_prunes_entries_no_load_can_use(bundle_copy, tmp_path):
    cache = tmp_path / "optimized"
    dict(EdgeCoCa.load(bundle_copy, optimized_cache=cache).runners.items())  # opens (and caches) all four
    old = {p.name for p in cache.iterdir()}
    assert len(old) == len(GRAPHS)
    fresh_staging = cache / ".decoder-fresh"  # another process writing now: kept
    fresh_staging.mkdir()
    left_staging = cache / ".decoder-left"  # a killed process's, two days ago: removed
    left_staging.mkdir()
    os.utime(left_staging, (time.time() - 2 * 86400,) * 2)
    # the re-exported decoder gets a new entry; its old entry (a changed source) goes
    (bundle_copy / "decoder.onnx.data").touch()
    _rewrite_manifest(bundle_copy)
    EdgeCoCa.load(bundle_copy, optimized_cache=cache).runners["decoder"]
    now = {p.name for p in cache.iterdir()}
    new_decoder = [n for n in now - old if n.startswith("decoder-")]
    assert len(new_decoder) == 1 and not [n for n in old - now if not n.startswith("decoder-")]
    assert len([n for n in now if n.startswith("decoder-")]) == 1
    assert fresh_staging.is_dir() and not left_staging.exists()
    # a deleted bundle's entries go when another bundle writes one
    other = shutil.copytree(bundle_copy, tmp_path / "other")
    shutil.rmtree(bundle_copy)
    EdgeCoCa.load(other, optimized_cache=cache).runners["decoder"]  # a new source path: a new entry
    sources = [json.loads((p / "entry.json").read_text())["source"] for p in cache.iterdir() if not p.name.startswith(".")]
    assert sources and all(Path(s).parent == other for s in sources)


def test_unwritable_optimized_graph_cache_still_loads(bundle_copy, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    model = EdgeCoCa.load(bundle_copy, optimized_cache=blocker / "optimized")
    assert all(r.opened_from.parent == bundle_copy for r in model.runners.values())
    assert _tokens(model).shape[0] == 2


def test_low_memory_sharing_skips_the_optimized_graph_cache(external_bundle, tmp_path):
    model = EdgeCoCa.load(external_bundle, memory="low", optimized_cache=tmp_path / "optimized")
    shared = [g for g, r in model.runners.items() if r._initializers]
    assert shared and all(model.runners[g].opened_from.parent == external_bundle for g in shared)
