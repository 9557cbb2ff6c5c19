"""Faithful students (issue #15): hard-negative captions, decoder-feature KD and the filter of
hallucinated teacher captions for sequence-level KD, on test-tiny."""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from coca_edge.data import COLORS, SHAPES, SyntheticScenes, reference_captions
from coca_edge.data.tasks import parse_caption, score_caption
from coca_edge.distill.cache import build_cache, cache_key, teacher_fingerprint
from coca_edge.distill.config import DataConfig, TrainConfig, TrainConfigError
from coca_edge.distill.data import TrainData, make_batch, open_train_data, tokenize, trim
from coca_edge.distill.faithful import (COLOR_WORDS, hallucinated, scene_negative, synthetic_negative,
                                        word_swap_negative)
from coca_edge.distill.forward import StudentForward, teacher_decoder_hidden, teacher_generated, teacher_outputs
from coca_edge.distill.losses import VocabSubset, hard_negative_loss, width_projection
from coca_edge.distill.trainer import _Dist, _HallucinationFilter, _losses, train
from coca_edge.models import CoCa
from coca_edge.tokenizer import Tokenizer

from tests.unit.test_distill_losses import batch  # noqa: F401  (the same pixels and captions fixture)

PAD = 0
MAX_LEN = 20
_SIZE_WORDS = {"small", "little", "large", "big"}
_WORDS = {"color": set(COLORS), "size": _SIZE_WORDS, "shape": set(SHAPES)}


def _words(text):
    return re.findall(r"[a-z]+", text)


# ------------------------------------------------------------------ hard negatives


def test_synthetic_negatives_differ_in_exactly_the_edited_attribute():
    ds = SyntheticScenes("train", seed=0, length=300, image_size=32)
    seen = Counter()
    for i in range(len(ds)):
        scene, caption, _ = ds.captioner(i)
        neg = synthetic_negative(ds, i)
        if neg is None:  # only captions that name no attribute at all ("two shapes", "one object")
            assert parse_caption(caption).mentions == [], caption
            seen["none"] += 1
            continue
        seen[(scene.n_objects, neg.kind, neg.attribute)] += 1
        attr, edited = neg.attribute, neg.scene.objects
        # the scene: only the intended attribute of the intended objects changed
        for k, (old, new) in enumerate(zip(scene.objects, edited)):
            rest = [f for f in ("shape", "color", "size", "x", "y", "diameter", "angle") if f != attr]
            assert all(getattr(old, f) == getattr(new, f) for f in rest), (i, k)
            if k not in neg.objects:
                assert getattr(new, attr) == getattr(old, attr), (i, k)
        if neg.kind == "swap":
            a, b = scene.objects
            assert neg.objects == (0, 1) and getattr(a, attr) != getattr(b, attr)
            assert (getattr(edited[0], attr), getattr(edited[1], attr)) == (getattr(b, attr), getattr(a, attr))
        else:
            (j,) = neg.objects
            assert getattr(edited[j], attr) != getattr(scene.objects[j], attr)
        # the caption: the positive's wording, different only in words of that attribute
        # (and the article before them); true of the edited scene, false of the real one
        pos_words, neg_words = _words(caption), _words(neg.caption)
        assert len(pos_words) == len(neg_words), (caption, neg.caption)
        diff = [(p, n) for p, n in zip(pos_words, neg_words) if p != n]
        assert diff, (caption, neg.caption)
        for p, n in diff:
            assert {p, n} <= _WORDS[attr] or {p, n} == {"a", "an"}, (caption, neg.caption)
        assert score_caption(caption, scene)["hallucinated"] == 0
        assert score_caption(neg.caption, neg.scene)["hallucinated"] == 0, (neg.caption, neg.scene)
        assert score_caption(neg.caption, scene)["hallucinated"] > 0, (caption, neg.caption)
        # attribute values of the mentions: the same multiset after a swap, one changed otherwise
        pos_m, neg_m = parse_caption(caption).mentions, parse_caption(neg.caption).mentions
        assert [{k: v for k, v in m.items() if k != attr} for m in pos_m] == \
               [{k: v for k, v in m.items() if k != attr} for m in neg_m]
        changed = [k for k, (p, n) in enumerate(zip(pos_m, neg_m)) if p.get(attr) != n.get(attr)]
        assert len(changed) == (2 if neg.kind == "swap" else 1), (caption, neg.caption)
    # every scene size and kind occurs in 300 samples
    assert {k[0] for k in seen if k != "none"} == {1, 2, 3}
    assert {(k[1], k[2]) for k in seen if k != "none"} >= {("swap", "color"), ("swap", "size"), ("change", "color"),
                                                           ("change", "size"), ("change", "shape")}
    assert seen["none"] < 0.1 * len(ds)


def test_negative_is_a_pure_function_of_the_sample():
    ds = SyntheticScenes("train", seed=0, length=50, image_size=32)
    again = SyntheticScenes("train", seed=0, length=50, image_size=32)
    assert [synthetic_negative(ds, i) for i in range(50)] == [synthetic_negative(again, i) for i in range(50)]


def test_swap_that_only_reorders_identical_objects_is_not_a_negative():
    ds = SyntheticScenes("train", seed=0, length=300, image_size=32)
    for i in range(len(ds)):
        scene, caption, recaption = ds.captioner(i)
        a, b = scene.objects[:2] if scene.n_objects == 2 else (None, None)
        if a is not None and a.size == b.size and a.shape == b.shape and a.color != b.color:
            neg = scene_negative(scene, caption, recaption, np.random.default_rng(0))
            # swapping the colours would only describe the same scene in another order
            assert neg is None or neg.kind != "swap" or neg.attribute != "color"
            return
    pytest.skip("no two-object scene with objects alike but for colour in 300 samples")


def test_batch_negatives_never_equal_a_positive(tiny_config):
    tok = Tokenizer()
    data = open_train_data(DataConfig(train_size=300, max_text_len=MAX_LEN), tiny_config)
    batch = make_batch(data, range(300), tok, tiny_config, MAX_LEN, negatives=True)
    neg = batch.negatives
    width = max(batch.text.shape[1], neg.text.shape[1])
    pos = F.pad(batch.text, (0, width - batch.text.shape[1]))
    negs = F.pad(neg.text, (0, width - neg.text.shape[1]))
    equal_any = (negs[:, None, :] == pos[None, :, :]).all(-1).any(1)
    assert not equal_any[neg.valid].any()
    # short captions do collide ("a blue shape" is another sample's positive): those are dropped
    has = torch.tensor([n is not None for n in data.negatives(range(300))])
    assert torch.equal(neg.valid, has & ~equal_any)
    assert (has & equal_any).any()

    captions = ["a red circle", "a blue circle", "two shapes"]
    toy = TrainData("toy", 3, {}, lambda idx: (np.zeros((len(idx), 32, 32, 3), np.uint8),
                                               [captions[i] for i in idx], [str(i) for i in idx]),
                    lambda idx: [captions[i] for i in idx],
                    lambda idx: [["a blue circle", "a green circle", None][i] for i in idx])
    assert make_batch(toy, [0, 1, 2], tok, tiny_config, MAX_LEN, negatives=True).negatives.valid.tolist() == \
           [False, True, False]
    assert make_batch(toy, [0, 2], tok, tiny_config, MAX_LEN, negatives=True).negatives.valid.tolist() == \
           [True, False]


def test_csv_word_swap_rule():
    neg = word_swap_negative("a red car parked on the street")
    assert neg is not None and neg != "a red car parked on the street"
    (word,) = [n for p, n in zip(_words("a red car parked on the street"), _words(neg)) if p != n]
    assert word in COLOR_WORDS and word != "red"
    assert word_swap_negative("a dog running on grass") is None
    assert word_swap_negative("A Red car and a blue door") == "A Blue car and a red door"
    assert word_swap_negative("a big dog next to a small cat") == "a small dog next to a big cat"
    assert word_swap_negative("a tiny house") == "a huge house"
    assert word_swap_negative("reddish tones") is None  # whole words only
    assert word_swap_negative("a red car") == word_swap_negative("a red car")  # deterministic


def test_csv_dataset_negatives(tmp_path, tiny_config):
    rows = []
    for i, caption in enumerate(["a red car", "a dog running on grass", "a big dog and a small cat"]):
        Image.new("RGB", (40, 40), (20 * i, 80, 120)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'}\t{caption}")
    (tmp_path / "d.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    data = open_train_data(DataConfig(dataset=str(tmp_path / "d.tsv"), max_text_len=MAX_LEN), tiny_config)
    found = data.negatives(range(3))
    assert found[1] is None and found[2] == "a small dog and a big cat"
    batch = make_batch(data, [0, 1, 2], Tokenizer(), tiny_config, MAX_LEN, negatives=True)
    assert batch.negatives.valid.tolist() == [True, False, True]
    assert not data.has_scenes


# ------------------------------------------------------------------ loss terms


def _cfg(**weights):
    loss = {"contrastive": 0.0, "caption": 0.0, **weights}
    return TrainConfig.from_dict({"model": "test-tiny", "teacher": {"path": "unused", "topk": 8}, "loss": loss})


def _negatives(text, valid):
    from coca_edge.distill.data import HardNegatives

    neg = text.clone()
    neg[:, 2] = (neg[:, 2] + 7) % 3000 + 1  # one token changed
    keys = torch.arange(4) + 100
    return HardNegatives(neg, torch.tensor(valid), keys, torch.arange(4))


def test_hard_negative_loss_is_negclip_and_reaches_both_towers(tiny_model, batch):
    pixels, text = batch
    negatives = _negatives(text, [True, False, True, True])
    fwd = StudentForward(tiny_model, VocabSubset(None, tiny_model.config.vocab_size), None, None, None)
    out = fwd(pixels, text, None, negatives.text)
    total, logs = _losses(out, text[:, 1:], None, _cfg(hard_negative=1.0), fwd.vocab, PAD, _Dist(), negatives)
    # reference: positives and the three valid negatives as image->text candidates
    cand = torch.cat([out["text"], out["negative_text"][[0, 2, 3]]])
    ref = F.cross_entropy(out["logit_scale"] * out["image"] @ cand.T, torch.arange(4))
    torch.testing.assert_close(total, ref)
    assert logs["hard_negative"] == pytest.approx(float(ref.detach()), rel=1e-6) and logs["hard_negative_share"] == 0.75
    # without valid negatives it is the image->text half of InfoNCE
    none = dataclasses.replace(negatives, valid=torch.zeros(4, dtype=torch.bool))
    plain = F.cross_entropy(out["logit_scale"] * out["image"] @ out["text"].T, torch.arange(4))
    torch.testing.assert_close(hard_negative_loss(out["image"], out["text"], out["negative_text"], none.valid,
                                                  out["logit_scale"]), plain)
    total.backward()
    params = dict(tiny_model.named_parameters())
    for name in ("text.proj", "text.blocks.0.attn.qkv.weight", "visual.proj", "visual.blocks.0.attn.qkv.weight",
                 "logit_scale"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert params["decoder.head"].grad is None or params["decoder.head"].grad.abs().sum() == 0


def _run_decoder(student, teacher, batch, projection):
    pixels, text = batch
    t = teacher_outputs(teacher, pixels, text, 8, 2.0, PAD, with_decoder_hidden=True)
    fwd = StudentForward(student, VocabSubset(None, student.config.vocab_size), None, None, None, projection)
    out = fwd(pixels, text)
    total, logs = _losses(out, text[:, 1:], t, _cfg(decoder_feature=1.0), fwd.vocab, PAD, _Dist())
    return total, logs


def test_decoder_feature_zero_when_student_is_teacher(tiny_model, batch):
    projection = width_projection(64, 64)
    assert isinstance(projection, torch.nn.Identity)
    total, logs = _run_decoder(tiny_model, copy.deepcopy(tiny_model), batch, projection)
    # fp32 round-off of identical computations: observed ~1e-7
    assert abs(logs["decoder_feature"]) < 1e-5 and abs(float(total.detach())) < 1e-5


def test_decoder_feature_gradient_reaches_decoder_and_projection(tiny_config, tiny_model, batch):
    wide = tiny_config.to_dict()
    wide.update(embed_dim=96)
    wide["text"]["width"] = wide["decoder"]["width"] = 96
    torch.manual_seed(7)
    teacher = CoCa(type(tiny_config).from_dict(wide))
    projection = width_projection(64, 96)
    total, logs = _run_decoder(tiny_model, teacher, batch, projection)
    assert logs["decoder_feature"] > 1e-3
    total.backward()
    assert projection.weight.shape == (96, 64) and projection.weight.grad.abs().sum() > 0
    params = dict(tiny_model.named_parameters())
    for name in ("decoder.blocks.0.attn.qkv.weight", "decoder.cross.1.q.weight", "decoder.ln_final.weight",
                 "text.blocks.0.attn.qkv.weight", "visual.pool.query"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    for name in ("decoder.head", "text.proj", "visual.proj", "logit_scale"):  # the head is after the states
        assert params[name].grad is None or params[name].grad.abs().sum() == 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_decoder_cache_equals_live_teacher_in_float16(tmp_path, tiny_config, tiny_model):
    data = open_train_data(DataConfig(train_size=6, max_text_len=MAX_LEN), tiny_config)
    tok = Tokenizer()
    pre = {"image_size": 32}
    key, spec = cache_key(teacher_fingerprint(tiny_model), data.identity, pre, MAX_LEN, 5, 2.0, "decoder")
    assert key != cache_key(teacher_fingerprint(tiny_model), data.identity, pre, MAX_LEN, 5, 2.0)[0]
    assert key == cache_key(teacher_fingerprint(tiny_model), data.identity, pre, MAX_LEN, 8, 1.0, "decoder")[0]
    cache = build_cache(tmp_path, key, spec, tiny_model, data, tok, MAX_LEN, batch_size=4, progress=False)
    assert cache.kind == "decoder" and cache.arrays["decoder_hidden"].dtype == np.float16
    assert cache.arrays["decoder_hidden"].shape == (6, MAX_LEN, tiny_config.decoder.width)
    batch = make_batch(data, [4, 1], tok, tiny_config, MAX_LEN)
    live = teacher_decoder_hidden(tiny_model, batch.pixels, batch.text, PAD)
    cached = cache.rows(batch.ids)["decoder_hidden"][:, : batch.text.shape[1] - 1].float()
    # float16 storage of layer-normed states (|x| up to ~4): relative step 2^-11
    torch.testing.assert_close(cached, live, atol=4e-3, rtol=1e-3)
    assert (cached[batch.text[:, 1:] == PAD] == 0).all()


# ------------------------------------------------------------------ hallucination filter


def test_hallucinated_marks_exactly_the_hallucinated_captions(tiny_config):
    ds = SyntheticScenes("train", seed=0, length=40, image_size=32)
    tok = Tokenizer()
    scenes, captions, expected = [], [], []
    for i in range(40):
        scene = ds.scene(i)
        neg = synthetic_negative(ds, i)
        wrong = i % 2 == 1 and neg is not None
        scenes.append(scene)
        captions.append(neg.caption if wrong else reference_captions(scene)[0])
        expected.append(wrong)
    captions[0] = ""  # an empty caption names nothing: not hallucinated
    ids = trim(torch.from_numpy(tokenize(tok, captions, MAX_LEN, tiny_config.eot_token_id, PAD)), PAD)
    assert hallucinated(ids, scenes, tok).tolist() == expected
    assert any(expected) and not all(expected)


def test_filter_masks_exactly_the_hallucinated_samples_in_seq_kd(tiny_config, tiny_model, batch):
    data = open_train_data(DataConfig(train_size=8, max_text_len=MAX_LEN), tiny_config)
    tok = Tokenizer()
    indices = [0, 1, 2, 3]
    scenes = data.scenes(indices)
    negs = [synthetic_negative(SyntheticScenes("train", seed=0, length=8, image_size=32), i) for i in indices]
    captions = [reference_captions(scenes[0])[0], negs[1].caption, reference_captions(scenes[2])[0], negs[3].caption]
    gen = trim(torch.from_numpy(tokenize(tok, captions, MAX_LEN, tiny_config.eot_token_id, PAD)), PAD)
    pixels, text = batch
    torch.manual_seed(7)
    teacher = CoCa(tiny_config)
    _, ids, lps = teacher_generated(teacher, pixels, gen.shape[1] - 1, 8, 2.0)
    t = teacher_outputs(teacher, pixels, text, 8, 2.0, PAD)
    t = dataclasses.replace(t, gen_text=gen, gen_topk_ids=ids, gen_topk_log_probs=lps)
    t = _HallucinationFilter(data, tok)(t, indices)
    assert t.gen_keep.tolist() == [True, False, True, False]
    cfg = _cfg(caption_seq_kd=1.0)
    fwd = StudentForward(tiny_model, VocabSubset(None, tiny_config.vocab_size), None, None, 2.0)
    out = fwd(pixels, text, t.gen_text)
    _, logs = _losses(out, text[:, 1:], t, cfg, fwd.vocab, PAD, _Dist())
    assert logs["seq_kd_filtered"] == 0.5
    # equals the term computed on the kept samples alone
    kept = [0, 2]
    t_kept = dataclasses.replace(t, gen_text=gen[kept], gen_topk_ids=ids[kept], gen_topk_log_probs=lps[kept],
                                 gen_keep=None)
    out_kept = {k: (v[kept] if k == "log_probs_seq_kd" else v) for k, v in out.items()}
    _, ref = _losses(out_kept, text[kept, 1:], t_kept, cfg, fwd.vocab, PAD, _Dist())
    assert logs["caption_seq_kd"] == pytest.approx(ref["caption_seq_kd"], rel=1e-6)


# ------------------------------------------------------------------ config


def test_levers_default_off_and_bad_config_is_named():
    cfg = TrainConfig()
    assert cfg.loss.hard_negative == 0 and cfg.loss.decoder_feature == 0 and not cfg.teacher.filter_hallucinated
    with pytest.raises(TrainConfigError, match=r"loss\.hard_negative must be >= 0"):
        TrainConfig.from_dict({"loss": {"hard_negative": -0.5}})
    with pytest.raises(TrainConfigError, match=r"loss\.decoder_feature must be >= 0"):
        TrainConfig.from_dict({"loss": {"decoder_feature": -1}, "teacher": {"path": "t"}})
    with pytest.raises(TrainConfigError, match=r"a teacher is needed \(loss\.decoder_feature > 0\)"):
        TrainConfig.from_dict({"loss": {"decoder_feature": 1.0}})
    with pytest.raises(TrainConfigError, match=r"teacher\.filter_hallucinated needs data\.dataset: synthetic-scenes"):
        TrainConfig.from_dict({"data": {"dataset": "my.tsv"}, "teacher": {"path": "t", "filter_hallucinated": True},
                               "loss": {"caption_seq_kd": 1.0}})
    with pytest.raises(TrainConfigError, match=r"teacher\.filter_hallucinated must be true or false"):
        TrainConfig.from_dict({"teacher": {"filter_hallucinated": "yes"}})
    # hard negatives need no teacher
    assert TrainConfig.from_dict({"loss": {"hard_negative": 0.5}}).loss.hard_negative == 0.5


def test_targets_cache_key_is_unchanged():
    # Computed with coca_edge/distill/cache.py before issue #15 (same inputs): existing caches
    # keep their directories.
    identity = {"dataset": "synthetic-scenes", "seed": 0, "length": 8,
                "scene_config": {"image_size": 32, "object_count_probs": [0.45, 0.35, 0.2],
                                 "single_attribute_share": 0.35, "noise_std": [3.0, 12.0], "max_clutter": 4,
                                 "color_jitter": 18}}
    pre = {"image_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
           "std": [0.26862954, 0.26130258, 0.27577711]}
    assert cache_key("ab" * 32, identity, pre, 31, 8, 2.0)[0] == "d2aad17008d23d0f5dc5"
    assert cache_key("ab" * 32, identity, pre, 31, 8, 2.0, "generated")[0] == "49f15ff7bb612396641c"


# ------------------------------------------------------------------ a tiny run


def _teacher(tmp_path, config):
    wide = config.to_dict()
    wide.update(embed_dim=96)
    wide["text"]["width"] = wide["decoder"]["width"] = 96
    wide = type(config).from_dict(wide)
    torch.manual_seed(5)
    path = tmp_path / "teacher.safetensors"
    save_file(CoCa(wide).state_dict(), str(path))
    (tmp_path / "config.json").write_text(wide.to_json())
    return path


def _run_cfg(tmp_path, teacher, name, on, steps=2, use_cache=True):
    loss = {"contrastive": 1.0, "caption": 1.0, "caption_seq_kd": 1.0}
    if on:
        loss.update(hard_negative=1.0, decoder_feature=1.0)
    return TrainConfig.from_dict({
        "model": "test-tiny", "output_dir": str(tmp_path / name), "steps": steps, "batch_size": 4, "threads": 1,
        "log_every": 1, "save_every": 1, "data": {"train_size": 8, "max_text_len": 12}, "loss": loss,
        "teacher": {"path": str(teacher), "cache_dir": str(tmp_path / "cache"), "topk": 4,
                    "filter_hallucinated": on, "use_cache": use_cache},
        "eval": {"at_end": False}})


def test_tiny_distill_run_with_all_levers(tmp_path, tiny_config):
    teacher = _teacher(tmp_path, tiny_config)
    train(_run_cfg(tmp_path, teacher, "off", False, steps=1), progress=False)
    before = {d.name: json.loads((d / "meta.json").read_text())["kind"] for d in (tmp_path / "cache").iterdir()}
    assert sorted(before.values()) == ["generated", "targets"]
    result = train(_run_cfg(tmp_path, teacher, "on", True), progress=False)
    after = {d.name: json.loads((d / "meta.json").read_text())["kind"] for d in (tmp_path / "cache").iterdir()}
    # switching the levers on adds the decoder-state cache and reuses both existing ones
    assert {k: v for k, v in after.items() if v != "decoder"} == before
    assert sorted(after.values()) == ["decoder", "generated", "targets"]
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["hard_negative"] > 0 and row["decoder_feature"] > 0
        assert 0 <= row["seq_kd_filtered"] <= 1 and 0 < row["hard_negative_share"] <= 1
    live = train(_run_cfg(tmp_path, teacher, "live", True, steps=1, use_cache=False), progress=False)
    (first,) = [json.loads(line) for line in (live.output_dir / "metrics.jsonl").read_text().splitlines()]
    for term in ("hard_negative", "hard_negative_share", "seq_kd_filtered", "caption_seq_kd"):
        assert first[term] == pytest.approx(rows[0][term], rel=1e-4, abs=2e-6), term
    # cached teacher states are float16: observed relative difference 2e-6
    assert first["decoder_feature"] == pytest.approx(rows[0]["decoder_feature"], rel=1e-3)
    # the decoder projection (64 -> 96) is checkpointed and restored on resume
    from safetensors.torch import load_file

    ckpts = result.output_dir / "checkpoints"
    extra = load_file(str(ckpts / (ckpts / "latest").read_text().strip() / "extra.safetensors"))
    assert extra["decoder_projector.weight"].shape == (96, 64)
    resumed = train(_run_cfg(tmp_path, teacher, "on", True, steps=3), resume="latest", progress=False)
    assert resumed.step == 3
