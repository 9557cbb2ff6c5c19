"""Decoder cache I/O: one tensor per layer and K / V (what ``export`` writes), and the stacked
``past_text`` / ``past_decoder`` of bundles exported before it, which still load, caption,
validate, quantize and localise."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from coca_edge.runtime import EdgeCoCa
from coca_edge.runtime.generation import fit_cache_feed


@pytest.fixture(scope="module")
def stacked_bundle(tiny_bundle, tmp_path_factory):
    """The session's tiny model (same weights as ``tiny_bundle``) exported with the stacked cache."""
    from coca_edge.exporters.bundle import export_bundle

    return export_bundle(tiny_bundle[1], tmp_path_factory.mktemp("bundles") / "tiny-stacked", cache_layout="stacked",
                         progress=False)


def _images(n=3, size=48):
    return list((np.random.default_rng(0).random((n, size, size, 3)) * 255).astype(np.uint8))


def test_both_layouts_are_recorded_and_detected(tiny_bundle, stacked_bundle):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current bundle loads without a word
        per = EdgeCoCa.load(tiny_bundle[0])
    with pytest.warns(UserWarning, match="stacked K/V cache") as caught:
        old = EdgeCoCa.load(stacked_bundle)
    assert str(stacked_bundle) in str(caught[0].message) and "re-exporting" in str(caught[0].message)
    assert not per.layout.stacked_cache and old.layout.stacked_cache
    old_inputs = json.loads((stacked_bundle / "manifest.json").read_text())["graphs"]["decoder"]["inputs"]
    assert [t["name"] for t in old_inputs[:3]] == ["input_ids", "past_text", "past_decoder"]
    assert old_inputs[1]["shape"] == [2, 2, "batch", 2, "past", 32]
    assert per.layout.past_names()[:2] == ["past_text_k_0", "past_text_v_0"]
    assert {n: a.shape for n, a in per.layout.empty_past(3).items()}["past_decoder_v_1"] == (3, 2, 0, 32)


@pytest.mark.parametrize("generation", [{"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3},
                                        {"strategy": "top_k", "seed": 3}])
def test_stacked_bundle_captions_like_per_layer(tiny_bundle, stacked_bundle, generation):
    """Identical tokens, including rows that finish early and beam reordering (``select``)."""
    per, old = EdgeCoCa.load(tiny_bundle[0]), EdgeCoCa.load(stacked_bundle)
    images = _images()
    expect = per.caption_ids(images, max_new_tokens=8, **generation).sequences
    assert old.caption_ids(images, max_new_tokens=8, **generation).sequences == expect
    # device-resident caches (IO binding; the CPU provider here) follow the graph's layout too
    for path in (tiny_bundle[0], stacked_bundle):
        io = EdgeCoCa.load(path).use_io_binding()
        assert io.caption_ids(images, max_new_tokens=8, **generation).sequences == expect


def test_fit_cache_feed_converts_between_layouts(tiny_bundle, stacked_bundle):
    per, old = EdgeCoCa.load(tiny_bundle[0]), EdgeCoCa.load(stacked_bundle)
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal(a.shape[:2] + (4,) + a.shape[3:]).astype(np.float32)
            for n, a in per.layout.empty_past(2).items()}
    feed["input_ids"] = np.ones((2, 1), np.int64)
    stacked = fit_cache_feed(feed, old.runners["decoder"].input_names)
    assert stacked["past_text"].shape == (2, 2, 2, 2, 4, 32) and "past_text_k_0" not in stacked
    assert np.array_equal(stacked["past_decoder"][1, 0], feed["past_decoder_k_1"])
    back = fit_cache_feed(stacked, per.runners["decoder"].input_names)
    assert back.keys() == feed.keys() and all(np.array_equal(back[n], feed[n]) for n in feed)
    assert fit_cache_feed(feed, per.runners["decoder"].input_names).keys() == feed.keys()  # already fits
    # one decode step on each graph: the same logits and, once stacked, the same caches
    edge_feed = {**feed, **{f"cross_{kv}_{i}": np.ascontiguousarray(c[i, j])
                            for c in [per.cross_kv(per._pixels(_images(2)))]
                            for i in range(c.shape[0]) for j, kv in enumerate("kv")}}
    a = per.runners["decoder"].run(edge_feed)
    b = old.runners["decoder"].run(fit_cache_feed(edge_feed, old.runners["decoder"].input_names))
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-5)
    for x, y in zip(per.layout.stack_past(per.layout.next_past(a)), old.layout.stack_past(old.layout.next_past(b))):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_stacked_bundle_validates_quantizes_and_localises_against_a_checkpoint(tiny_bundle, stacked_bundle, tmp_path):
    """The PyTorch reference decodes with per-layer caches; a stacked candidate is compared on
    the same feeds, quantized with decoder calibration recorded in its own layout, and localised
    on its FP32 source graphs with the reference's feeds converted."""
    from safetensors.torch import save_file

    from coca_edge.calibration import CalibrationData
    from coca_edge.quantize import Fp32Config, Int8StaticConfig, quantize
    from coca_edge.validate import Validator

    model = tiny_bundle[1]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(model.config.to_json())
    validator = Validator(ckpt / "model.safetensors", samples=6, max_new_tokens=5, tensor_samples=6, progress=False)
    fp32 = validator.evaluate(stacked_bundle, latency=False).metrics
    assert fp32["decoder.present_text.max_abs"] < 1e-4 and fp32["decoder.present_decoder.max_abs"] < 1e-4
    assert fp32["caption_exact_match"] == 1.0

    calib = CalibrationData("synthetic-scenes:train", samples=4, batch_size=4, decoder_images=4, decoder_steps=2,
                            max_new_tokens=4)
    plan = {"image_encoder": Fp32Config(), "text_encoder": Fp32Config(), "cross_kv": Fp32Config(),
            "decoder": Int8StaticConfig(method="minmax")}
    int8 = quantize(stacked_bundle, plan, tmp_path / "int8", calib, progress=False, cache_dir=tmp_path / "cache")
    assert EdgeCoCa.load(int8).layout.stacked_cache
    assert validator.evaluate(int8, latency=False).metrics["decoder.present_decoder.max_abs"] > 0
    drifts, notes = validator.localize(int8, top_k=3)
    assert drifts and {d.graph for d in drifts} == {"decoder"}, notes
