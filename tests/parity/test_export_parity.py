"""Exported graphs vs PyTorch, and runtime generation vs the PyTorch reference decoders."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coca_edge.exporters.onnx import VALIDATION_CASES, validate_graph
from coca_edge.exporters.specs import graph_specs
from coca_edge.models import CoCa, get_preset
from coca_edge.models.generate import beam_search, greedy_generate
from coca_edge.runtime import EdgeCoCa


def _eot_prone(model: CoCa) -> CoCa:
    """Make the end token likely so beam search closes hypotheses early and at different steps.

    The end token's output column copies that of the token greedy decoding emits most often
    (random models repeat a few tokens), so wherever that token would win the end token does.
    """
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = greedy_generate(model, pixels, max_new_tokens=15)[:, 1:].flatten()
    common = int(torch.mode(tokens).values)
    with torch.no_grad():
        model.decoder.head[:, model.config.eot_token_id] = model.decoder.head[:, common] * 1.01
    return model


def _greedy_matches(model, runtime, pixels, tokens):
    ref = greedy_generate(model, torch.from_numpy(pixels), max_new_tokens=tokens)
    out = runtime.caption_ids(pixels, max_new_tokens=tokens)
    assert len(out.sequences) == len(pixels)
    for i, seq in enumerate(out.sequences):
        assert ref[i, 1:1 + len(seq)].tolist() == seq, f"image {i}"
        assert len(seq) == tokens or seq[-1] == model.config.eot_token_id


def test_tiny_graphs_within_tolerance(tiny_bundle):
    path, model = tiny_bundle
    specs = graph_specs(model.config)
    for name in ("image_encoder", "text_encoder", "cross_kv", "decoder"):
        report = validate_graph(path / f"{name}.onnx", specs[name], model)
        assert len(report) == len(VALIDATION_CASES[name]) * len(specs[name].outputs)
        assert all(r["max_abs"] <= r["tolerance"] for r in report)


def test_tiny_greedy_and_beam(tiny_bundle, tmp_path):
    path, model = tiny_bundle
    runtime = EdgeCoCa.load(path)
    pixels = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    _greedy_matches(model, runtime, pixels, tokens=30)
    ref = beam_search(model, torch.from_numpy(pixels[:3]), num_beams=3, max_new_tokens=10)
    out = runtime.caption_ids(pixels[:3], strategy="beam", num_beams=3, max_new_tokens=10)
    assert out.sequences == ref


def test_beam_with_early_end_tokens(tmp_path):
    """Beams that close at different steps (the hypothesis bookkeeping path)."""
    from coca_edge.exporters.bundle import export_bundle

    torch.manual_seed(0)
    model = _eot_prone(CoCa(get_preset("test-tiny")).eval())
    export_bundle(model, tmp_path / "b", graphs=("image_encoder", "cross_kv", "decoder", "text_encoder"),
                  progress=False)
    runtime = EdgeCoCa.load(tmp_path / "b")
    pixels = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    for min_new in (0, 2):
        ref = beam_search(model, torch.from_numpy(pixels), num_beams=3, max_new_tokens=15, min_new_tokens=min_new)
        out = runtime.caption_ids(pixels, strategy="beam", num_beams=3, max_new_tokens=15, min_new_tokens=min_new)
        assert out.sequences == ref
    ends = [seq[-1] == model.config.eot_token_id for seq in ref]
    assert any(ends), "the end-token-prone model should finish some captions"
    _greedy_matches(model, runtime, pixels, tokens=15)


def test_fused_cross_kv_and_torchscript(tmp_path):
    from coca_edge.exporters.bundle import export_bundle

    torch.manual_seed(0)
    model = CoCa(get_preset("test-tiny")).eval()
    export_bundle(model, tmp_path / "fused", fuse_cross_kv=True, exporter="torchscript", progress=False)
    runtime = EdgeCoCa.load(tmp_path / "fused")
    assert "cross_kv" not in runtime.runners
    pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _greedy_matches(model, runtime, pixels, tokens=20)


@pytest.mark.slow
def test_vit_b32_export_parity(tmp_path):
    """coca_ViT-B-32 with random weights (every parameter initialised): all graphs, greedy and beam."""
    from coca_edge.exporters.bundle import export_bundle

    torch.manual_seed(0)
    model = CoCa(get_preset("coca_ViT-B-32")).eval()
    export_bundle(model, tmp_path / "b32", progress=False)  # validates every graph on several shapes
    runtime = EdgeCoCa.load(tmp_path / "b32", verify_hashes=False)
    pixels = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32).clip(-2, 2)
    _greedy_matches(model, runtime, pixels, tokens=20)
    ref = beam_search(model, torch.from_numpy(pixels[:1]), num_beams=3, max_new_tokens=6)
    assert runtime.caption_ids(pixels[:1], strategy="beam", num_beams=3, max_new_tokens=6).sequences == ref


def test_mismatch_raises_typed_error(tiny_bundle):
    from coca_edge.exporters.onnx import GraphMismatchError

    path, model = tiny_bundle
    torch.manual_seed(1)
    other = CoCa(get_preset("test-tiny")).eval()  # different weights than the exported graph
    spec = graph_specs(model.config)["text_encoder"]
    with pytest.raises(GraphMismatchError, match=r"graph 'text_encoder' output 'text_embed' \(batch=1, seq=5, "
                                                 r"past=0\): max-abs error .* exceeds tolerance 5e-05") as info:
        validate_graph(path / "text_encoder.onnx", spec, other)
    assert info.value.graph == "text_encoder" and info.value.max_error > info.value.tolerance


def test_cross_kv_graph_folds_layernorm_and_bias(tmp_path):
    """The exported cross K/V folds each layer's LayerNorm scale/shift and K/V bias into one
    broadcast MatMul; random init leaves those at 1 / 0, so perturb them to exercise the fold."""
    from coca_edge.exporters.onnx import export_onnx
    from coca_edge.exporters.specs import _CrossKVProjection

    torch.manual_seed(0)
    model = CoCa(get_preset("test-tiny")).eval()
    with torch.no_grad():
        for blk in model.decoder.cross:
            blk.ln_1_kv.weight.uniform_(0.5, 1.5)
            blk.ln_1_kv.bias.normal_(0, 0.3)
            blk.kv.bias.normal_(0, 0.3)
        tokens = torch.randn(3, model.config.vision.num_image_tokens, model.config.embed_dim)
        expected = model.cross_kv(tokens)
        folded = _CrossKVProjection(model)(tokens)
    assert folded.shape == expected.shape
    assert torch.allclose(folded, expected, atol=1e-5), (folded - expected).abs().max()
    # export validation compares the graphs with the model's own cross_kv, not the folded module
    for fuse, graph in ((False, "cross_kv"), (True, "image_encoder")):
        result = export_onnx(model, tmp_path / graph, graphs=(graph,), fuse_cross_kv=fuse, progress=False)
        checked = [r for r in result[graph]["validation"] if r["output"] == "cross_kv"]
        assert checked and all(r["max_abs"] <= r["tolerance"] for r in checked)


def test_export_quiets_only_the_torchvision_skip_warnings():
    """Without torchvision (the `cpu` extra) the dynamo exporter logs four skip warnings per
    graph; exporting drops those and nothing else, and only while it runs."""
    import logging

    from coca_edge.exporters.onnx import _REGISTRATION_LOGGER, _export_patches

    logger = logging.getLogger(_REGISTRATION_LOGGER)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with _export_patches():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("another registration warning")
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another registration warning", "torchvision is not installed. Skipping torchvision::nms"]
