"""Calibration feeds per graph on the test-tiny bundle (coca_edge.calibration)."""
from __future__ import annotations

import numpy as np
import pytest

from coca_edge.calibration import CalibrationData, CalibrationError, CalibrationSet, FeedReader
from coca_edge.runtime import EdgeCoCa
from coca_edge.runtime.generation import GenerationConfig, generate


@pytest.fixture(scope="module")
def calib(tiny_bundle):
    path, _ = tiny_bundle
    return CalibrationSet(path, CalibrationData("synthetic-scenes:train", samples=12, batch_size=4,
                                                decoder_images=8, decoder_steps=3, max_new_tokens=6))


def test_feeds_are_keyed_by_graph_inputs(calib, tiny_bundle):
    edge = EdgeCoCa.load(tiny_bundle[0])
    for graph in ("image_encoder", "text_encoder", "cross_kv", "decoder"):
        feeds = calib.feeds(graph)
        assert feeds, graph
        for feed in feeds:
            assert sorted(feed) == sorted(edge.runners[graph].input_names), graph
    assert [f["pixel_values"].shape for f in calib.feeds("image_encoder")] == [(4, 3, 32, 32)] * 3
    ids = np.concatenate([f["input_ids"] for f in calib.feeds("text_encoder")])
    assert ids.shape == (12, 76) and (ids[:, 0] == edge.layout.sot_token_id).all()
    assert calib.feeds("cross_kv")[0]["image_tokens"].shape == (4, 15, 64)


def test_decoder_feeds_come_from_greedy_generation(calib, tiny_bundle):
    feeds = calib.feeds("decoder")
    pasts = sorted({f["past_text_k_0"].shape[2] for f in feeds})
    assert 0 in pasts and max(pasts) > 0, pasts
    # A recorded step at past p feeds the token greedy generation picked at step p - 1.
    edge = EdgeCoCa.load(tiny_bundle[0])
    pixels = calib._samples()[0][:4]
    seqs = generate(edge.runners["decoder"], edge.cross_kv(pixels), edge.layout,
                    GenerationConfig(max_new_tokens=6)).sequences
    first_batch = [f for f in feeds[:3]]  # _spread keeps 3 steps of the first batch
    for feed in first_batch:
        p = feed["past_text_k_0"].shape[2]
        if p == 0:
            assert (feed["input_ids"][:, 0] == edge.layout.sot_token_id).all()
        elif feed["input_ids"].shape[0] == len(seqs):
            assert feed["input_ids"][:, 0].tolist() == [s[p - 1] for s in seqs]
    assert len(feeds) <= 2 * 3, "decoder_steps bounds the steps kept per batch"


def test_feed_reader_contract():
    feeds = [{"x": np.zeros(1)}, {"x": np.ones(1)}]
    reader = FeedReader(feeds)
    assert len(reader) == 2
    assert reader.get_next() is feeds[0] and reader.get_next() is feeds[1] and reader.get_next() is None
    reader.rewind()
    assert reader.get_next() is feeds[0]
    reader.set_range(1, 2)
    assert reader.get_next() is feeds[1] and reader.get_next() is None


def test_image_arrays_are_checked(tiny_bundle):
    path, _ = tiny_bundle
    with pytest.raises(CalibrationError, match="empty"):
        CalibrationSet(path, np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError, match=r"float32 \[N, 3, 32, 32\]"):
        CalibrationSet(path, np.zeros((2, 3, 64, 64), np.float32))
    raw = CalibrationSet(path, np.zeros((2, 40, 40, 3), np.uint8))  # raw images are preprocessed to 32 px
    assert raw.feeds("image_encoder")[0]["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(CalibrationError, match="captions"):
        raw.feeds("text_encoder")


def test_bad_specs(tiny_bundle):
    with pytest.raises(CalibrationError, match="samples"):
        CalibrationData("synthetic-scenes:train", samples=0)
    with pytest.raises(CalibrationError, match="no such file"):
        CalibrationSet(tiny_bundle[0], "/nonexistent/data.csv").feeds("image_encoder")


def test_key_changes_with_data(tiny_bundle):
    a = CalibrationSet(tiny_bundle[0], "synthetic-scenes:train", samples=8)
    b = CalibrationSet(tiny_bundle[0], "synthetic-scenes:train", samples=16)
    c = CalibrationSet(tiny_bundle[0], "synthetic-scenes:train", samples=8)
    assert a.key_digest() != b.key_digest() and a.key_digest() == c.key_digest()
