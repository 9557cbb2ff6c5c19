"""Teacher-output cache: equals the live teacher, keyed by what it depends on."""
from __future__ import annotations

import shutil

import pytest
import torch

from coca_edge.distill.cache import CacheError, build_cache, cache_key, open_cache, teacher_fingerprint
from coca_edge.distill.config import DataConfig
from coca_edge.distill.data import make_batch, open_train_data
from coca_edge.distill.forward import teacher_generated, teacher_outputs
from coca_edge.tokenizer import Tokenizer

MAX_LEN = 20


def _spec(model, data, topk=5, temperature=2.0, kind="targets"):
    pre = {"image_size": model.config.vision.image_size}
    return cache_key(teacher_fingerprint(model), data.identity, pre, MAX_LEN, topk, temperature, kind)


def test_cache_equals_live_teacher(tmp_path, tiny_config, tiny_model):
    data = open_train_data(DataConfig(train_size=12, max_text_len=MAX_LEN), tiny_config)
    tok = Tokenizer()
    key, spec = _spec(tiny_model, data)
    cache = build_cache(tmp_path, key, spec, tiny_model, data, tok, MAX_LEN, batch_size=5, progress=False)
    assert len(cache) == 12 and open_cache(tmp_path, key) is not None
    batch = make_batch(data, [7, 2, 11], tok, tiny_config, MAX_LEN)
    live = teacher_outputs(tiny_model, batch.pixels, batch.text, 5, 2.0, 0)
    cached = cache.lookup(batch.ids).positions(batch.text.shape[1] - 1)
    # batch composition changes the padded length, not the math: observed ~1e-6
    torch.testing.assert_close(cached.image, live.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.text, live.text, atol=1e-5, rtol=0)
    mask = batch.text[:, 1:] != 0
    assert torch.equal(cached.topk_ids[mask], live.topk_ids[mask])
    torch.testing.assert_close(cached.topk_log_probs[mask], live.topk_log_probs[mask], atol=1e-4, rtol=0)


def test_key_changes_with_teacher_data_and_settings(tiny_config, tiny_model):
    data = open_train_data(DataConfig(train_size=12), tiny_config)
    key = _spec(tiny_model, data)[0]
    assert _spec(tiny_model, open_train_data(DataConfig(train_size=12, seed=1), tiny_config))[0] != key
    assert _spec(tiny_model, data, topk=6)[0] != key
    assert _spec(tiny_model, data, temperature=1.0)[0] != key
    with torch.no_grad():
        tiny_model.decoder.head[0, 0] += 1e-3
    assert _spec(tiny_model, data)[0] != key


def test_interrupted_build_is_not_used(tmp_path, tiny_config, tiny_model):
    data = open_train_data(DataConfig(train_size=4, max_text_len=MAX_LEN), tiny_config)
    key, spec = _spec(tiny_model, data)
    cache = build_cache(tmp_path, key, spec, tiny_model, data, Tokenizer(), MAX_LEN, progress=False)
    (cache.path / "meta.json").unlink()  # what a build killed before its last write leaves
    assert open_cache(tmp_path, key) is None
    shutil.rmtree(cache.path)


def test_generated_cache_equals_live_generation(tmp_path, tiny_config, tiny_model):
    data = open_train_data(DataConfig(train_size=7, max_text_len=MAX_LEN), tiny_config)
    tok = Tokenizer()
    key, spec = _spec(tiny_model, data, kind="generated")
    assert key != _spec(tiny_model, data)[0]  # its own directory: the targets cache is not rebuilt
    cache = build_cache(tmp_path, key, spec, tiny_model, data, tok, MAX_LEN, batch_size=3, progress=False)
    assert cache.kind == "generated" and len(cache) == 7
    with pytest.raises(CacheError, match="'generated' cache"):
        cache.lookup(["x"])
    batch = make_batch(data, [5, 0], tok, tiny_config, MAX_LEN)
    gen, ids, lps = teacher_generated(tiny_model, batch.pixels, MAX_LEN, 5, 2.0)
    rows = cache.rows(batch.ids)
    assert torch.equal(rows["gen_text"].long(), gen)
    mask = gen[:, 1:] != 0
    assert torch.equal(rows["gen_topk_ids"].long()[mask], ids[mask])
    # batch composition only: observed ~1e-6
    torch.testing.assert_close(rows["gen_topk_log_probs"][mask], lps[mask], atol=1e-4, rtol=0)


def _same_batch(a, b):
    assert a.ids == b.ids
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.text, b.text)
    if a.negatives is not None:
        for field in ("text", "valid", "keys", "positive_keys"):
            assert torch.equal(getattr(a.negatives, field), getattr(b.negatives, field)), field


@pytest.mark.parametrize("keep_all", [True, False])  # False: room for ~3 samples only
def test_memoised_batches_equal_fresh_ones(tiny_config, keep_all):
    tok = Tokenizer()
    plain = open_train_data(DataConfig(train_size=12, max_text_len=MAX_LEN, memory_cache_mb=0), tiny_config)
    memo = open_train_data(DataConfig(train_size=12, max_text_len=MAX_LEN, memory_cache_mb=1), tiny_config)
    if not keep_all:
        memo._memo.budget = 3 * plain.fetch([0])[0][0].nbytes + 500
    for indices in ([7, 2, 11, 2], [2, 7, 3], range(12), [11, 0]):  # repeats, order, new samples
        fresh = make_batch(plain, indices, tok, tiny_config, MAX_LEN, negatives=True)
        again = make_batch(memo, indices, tok, tiny_config, MAX_LEN, negatives=True)
        _same_batch(fresh, again)
    assert 0 < memo._memo.used <= memo._memo.budget
    kept = {i for kind, i in memo._memo.values if kind == ("sample",)}
    assert len(kept) == 12 if keep_all else 0 < len(kept) < 4
    assert plain._memo.used == 0 and not plain._memo.values


def test_memory_cache_mb_is_checked():
    with pytest.raises(ValueError, match="memory_cache_mb"):
        DataConfig(memory_cache_mb=-1)
