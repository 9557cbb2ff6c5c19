"""Loss terms on test-tiny: KD terms vanish when student == teacher, are positive
otherwise, and send gradient where they should; the vocabulary-subset softmax is exact."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from coca_edge.distill.config import TrainConfig
from coca_edge.distill.forward import (StudentForward, decoder_hidden, teacher_generated, teacher_outputs,
                                      text_forward)
from coca_edge.distill.losses import FeatureProjector, VocabSubset, caption_loss
from coca_edge.distill.trainer import _Dist, _losses
from coca_edge.models import CoCa

PAD = 0


@pytest.fixture()
def batch(tiny_config):
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    text = torch.zeros(4, 10, dtype=torch.long)  # one pad column after the longest, as data.trim keeps
    for i, n in enumerate((8, 6, 7, 5)):
        text[i, 0] = tiny_config.sot_token_id
        text[i, 1:n] = torch.randint(1, 3000, (n - 1,), generator=g)
        text[i, n] = tiny_config.eot_token_id
    return pixels, text


def _cfg(**weights):
    loss = {"contrastive": 0.0, "caption": 0.0, **weights}
    return TrainConfig.from_dict({"model": "test-tiny", "teacher": {"path": "unused", "topk": 16}, "loss": loss})


def _run(student_model, teacher_model, batch, cfg, vocab=None):
    pixels, text = batch
    vocab = vocab or VocabSubset(None, student_model.config.vocab_size)
    projector = FeatureProjector(student_model.config.embed_dim, teacher_model.config.embed_dim) if cfg.loss.feature else None
    temperature = cfg.loss.kd_temperature
    fwd = StudentForward(student_model, vocab, projector, temperature if cfg.loss.caption_kd else None,
                         temperature if cfg.loss.caption_seq_kd else None)
    t = teacher_outputs(teacher_model, pixels, text, cfg.teacher.topk, temperature, PAD)
    if cfg.loss.caption_seq_kd:
        t = t.with_generated(*teacher_generated(teacher_model, pixels, text.shape[1] - 1, cfg.teacher.topk,
                                                temperature), PAD)
    out = fwd(pixels, text, t.gen_text)
    total, logs = _losses(out, text[:, 1:], t, cfg, vocab, PAD, _Dist())
    return total, logs, fwd


@pytest.mark.parametrize("term", ["affinity", "feature", "caption_kd", "caption_seq_kd"])
def test_kd_term_zero_when_student_is_teacher(tiny_model, batch, term):
    total, logs, _ = _run(tiny_model, copy.deepcopy(tiny_model), batch, _cfg(**{term: 1.0}))
    # fp32 round-off of identical computations: observed <= 1e-6
    assert abs(logs[term]) < 1e-5
    assert abs(float(total.detach())) < 1e-5


@pytest.mark.parametrize("term", ["affinity", "feature", "caption_kd", "caption_seq_kd"])
def test_kd_term_positive_otherwise(tiny_config, tiny_model, batch, term):
    torch.manual_seed(7)
    other = CoCa(tiny_config)
    _, logs, _ = _run(tiny_model, other, batch, _cfg(**{term: 1.0}))
    assert logs[term] > 1e-3


# Parameters each term must reach, and parameters it must not touch.
_REACHES = {
    "affinity": (["logit_scale", "visual.proj", "text.proj"], ["decoder.head"]),
    "feature": (["visual.proj", "text.proj", "visual.blocks.0.attn.qkv.weight"], ["decoder.head", "logit_scale"]),
    "caption_kd": (["decoder.head", "decoder.cross.0.q.weight", "text.blocks.0.attn.qkv.weight"], ["visual.proj", "text.proj", "logit_scale"]),
    "caption_seq_kd": (["decoder.head", "decoder.cross.0.q.weight", "text.blocks.0.attn.qkv.weight",
                        "visual.pool.query"], ["visual.proj", "text.proj", "logit_scale"]),
    "contrastive": (["logit_scale", "visual.proj", "text.proj"], ["decoder.head"]),
    "caption": (["decoder.head", "visual.pool.query"], ["visual.proj", "text.proj", "logit_scale"]),
}


@pytest.mark.parametrize("term", sorted(_REACHES))
def test_gradient_reaches_intended_parameters(tiny_config, tiny_model, batch, term):
    torch.manual_seed(7)
    teacher = CoCa(tiny_config)
    total, _, fwd = _run(tiny_model, teacher, batch, _cfg(**{term: 1.0}))
    total.backward()
    params = dict(tiny_model.named_parameters())
    yes, no = _REACHES[term]
    for name in yes:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    for name in no:
        assert params[name].grad is None or params[name].grad.abs().sum() == 0, name
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_projection_when_widths_differ(tiny_config, tiny_model, batch):
    wide = tiny_config.to_dict()
    wide.update(embed_dim=96)
    wide["text"]["width"] = wide["decoder"]["width"] = 96
    teacher = CoCa(type(tiny_config).from_dict(wide))
    total, logs, fwd = _run(tiny_model, teacher, batch, _cfg(feature=1.0, affinity=1.0))
    total.backward()
    assert fwd.projector.image.weight.shape == (96, 64)
    assert fwd.projector.image.weight.grad.abs().sum() > 0
    assert logs["affinity"] > 0


def test_vocab_subset_is_exact_full_softmax(tiny_model, batch):
    pixels, text = batch
    ids = torch.unique(torch.cat([text.flatten(), torch.arange(100, 300)]))
    ids = ids[ids != PAD]
    outside = torch.ones(tiny_model.config.vocab_size, dtype=torch.bool)
    outside[ids] = False
    with torch.no_grad():
        tiny_model.decoder.head[:, outside] = 0
    _, states = text_forward(tiny_model, text)
    hidden = decoder_hidden(tiny_model, states[:, :-1], tiny_model.cross_kv(tiny_model.encode_image(pixels)[1]))
    full = (hidden @ tiny_model.decoder.head).log_softmax(-1)
    sub = VocabSubset(ids, tiny_model.config.vocab_size)
    lp = sub.log_probs(hidden, tiny_model.decoder.head)
    query = torch.tensor([[5, int(ids[3]), 49000]]).expand(4, 9, 3)  # outside, inside, outside
    # fp32 log-softmax over 49408 columns vs over |ids|+1: observed relative error 4e-6
    torch.testing.assert_close(sub.gather(lp, query), full.gather(-1, query), atol=1e-6, rtol=2e-5)
    torch.testing.assert_close(sub.mean_log_prob(lp), full.mean(-1), atol=1e-6, rtol=2e-5)
    labels = text[:, 1:]
    for eps in (0.0, 0.1):
        s, n = caption_loss(lp, labels, sub, PAD, eps)
        mask = labels != PAD
        ref = F.cross_entropy(full[mask], labels[mask], label_smoothing=eps, reduction="sum")
        torch.testing.assert_close(s, ref, atol=1e-3, rtol=1e-5)


def test_training_forward_matches_model(tiny_model, batch):
    pixels, text = batch
    full = torch.cat([text, torch.zeros(4, 76 - text.shape[1], dtype=torch.long)], dim=1)
    ref_embed, ref_states = tiny_model.encode_text(full)
    embed, states = text_forward(tiny_model, text)
    # same math on a shorter sequence: observed ~1e-7
    torch.testing.assert_close(embed, ref_embed, atol=1e-5, rtol=0)
    torch.testing.assert_close(states, ref_states[:, : text.shape[1]], atol=1e-5, rtol=0)
    out = tiny_model(pixels, text)
    hidden = decoder_hidden(tiny_model, states[:, :-1], tiny_model.cross_kv(tiny_model.encode_image(pixels)[1]))
    torch.testing.assert_close(hidden @ tiny_model.decoder.head, out["logits"], atol=1e-5, rtol=0)


def test_teacher_topk_with_zero_head_columns_is_exact(tiny_model, batch):
    from coca_edge.distill.forward import _topk_log_probs

    rows = torch.randn(6, 64)
    head = tiny_model.decoder.head.detach().clone()
    head[:, 500:] = 0
    head[:, :400] -= 5.0  # push some used tokens below the zero-logit ones
    values, ids = _topk_log_probs(rows, head, 8, 2.0)
    full = ((rows @ head) / 2.0).log_softmax(-1)
    ref_values, _ = full.topk(8, dim=-1)
    # fp32 log-softmax over 49408 columns vs over the used ones: observed relative error 1.3e-5
    torch.testing.assert_close(values, ref_values, atol=1e-6, rtol=3e-5)
    torch.testing.assert_close(full.gather(-1, ids), values, atol=1e-6, rtol=3e-5)


def test_generated_targets_follow_the_teachers_own_greedy_caption(tiny_model, batch):
    """Sequence-level KD targets: the top-1 of the teacher-forced distribution along the
    generated caption is the token greedy decoding chose (cached decode == full forward)."""
    pixels, _ = batch
    gen, ids, lps = teacher_generated(tiny_model, pixels, 12, 4, 2.0)
    assert gen.shape == (4, 13) and ids.shape == (4, 12, 4)
    labels = gen[:, 1:]
    mask = labels != PAD
    assert mask[:, 0].all()
    assert torch.equal(ids[..., 0][mask], labels[mask])
    assert (lps[..., 0][mask] >= lps[..., 1][mask]).all()
    # positions after a caption's end token carry no target
    assert torch.equal(lps[~mask], torch.full_like(lps[~mask], -30.0))


def test_seq_kd_needs_generated_captions_switched_on(tiny_model, batch):
    pixels, text = batch
    fwd = StudentForward(tiny_model, VocabSubset(None, tiny_model.config.vocab_size), None, None, None)
    with pytest.raises(ValueError, match="sequence-level KD is off"):
        fwd(pixels, text, text)
