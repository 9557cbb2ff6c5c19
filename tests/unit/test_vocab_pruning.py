"""Vocabulary pruning (``CoCaConfig.vocab_subset``): config checks, exactness of a pruned
model against its source, inheritance, training with ``vocab: data``, export and INT8."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from coca_edge.distill.config import TrainConfig
from coca_edge.distill.losses import VocabSubset, caption_kd_loss, caption_loss
from coca_edge.distill.trainer import train
from coca_edge.models import PRUNED_LOGIT, CoCa, ConfigError, InheritError, get_preset, inherit_weights, prune_vocabulary
from coca_edge.models.generate import greedy_generate
from coca_edge.models.openclip import CheckpointError, load_checkpoint, save_open_clip

KEEP = list(range(1, 300))


@pytest.fixture()
def pruned(tiny_model):
    return prune_vocabulary(tiny_model, KEEP).eval()


def test_config_checks_and_unpruned_dict_is_unchanged(tiny_config):
    c = tiny_config
    assert "vocab_subset" not in c.to_dict()  # every existing config hash stays the same
    ok = c.replace(vocab_subset=(0, 5, c.sot_token_id, c.eot_token_id))
    assert ok.vocab_rows == 4 and ok.vocab_size == c.vocab_size
    assert type(c).from_dict(json.loads(ok.to_json())) == ok
    bad = {"sorted": (0, c.eot_token_id, c.sot_token_id), "contain the sot_token_id": (0, c.eot_token_id),
           "lie in": (0, c.sot_token_id, c.eot_token_id, c.vocab_size)}
    for message, subset in bad.items():
        with pytest.raises(ConfigError, match=message):
            c.replace(vocab_subset=subset)


def test_pruned_model_computes_what_the_original_does(tiny_model, pruned, tiny_pixels):
    cfg = tiny_model.config
    assert pruned.config.vocab_subset == tuple(sorted({*KEEP, cfg.sot_token_id, cfg.eot_token_id, cfg.pad_token_id}))
    full_n = sum(p.numel() for p in tiny_model.parameters())
    rows = pruned.config.vocab_rows
    assert sum(p.numel() for p in pruned.parameters()) == full_n - 2 * (cfg.vocab_size - rows) * cfg.text.width
    ids = torch.tensor([[cfg.sot_token_id, 5, 17, 250, cfg.eot_token_id, 0, 0]] * 3)
    a, b = tiny_model(tiny_pixels, ids), pruned(tiny_pixels, ids)
    assert torch.equal(a["image_features"], b["image_features"])
    assert torch.allclose(a["text_features"], b["text_features"], atol=1e-6)
    kept = torch.tensor(pruned.config.vocab_subset)
    assert b["logits"].shape == a["logits"].shape  # logits over the whole id space
    assert torch.allclose(a["logits"][..., kept], b["logits"][..., kept], atol=1e-5)
    outside = torch.ones(cfg.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert bool((b["logits"][..., outside] == PRUNED_LOGIT).all())
    # an id outside the subset embeds as the pad token
    other = ids.clone()
    other[:, 2] = 40000
    padded = ids.clone()
    padded[:, 2] = cfg.pad_token_id
    assert torch.equal(pruned.text.embed(other), pruned.text.embed(padded))
    # generation only ever emits kept tokens
    gen = greedy_generate(pruned, tiny_pixels, max_new_tokens=12)
    assert set(gen.flatten().tolist()) <= set(pruned.config.vocab_subset)


def test_inheritance_with_subsets(tiny_model, pruned):
    cfg = tiny_model.config
    narrower = pruned.config.vocab_subset[::2]
    narrower = tuple(sorted({*narrower, cfg.sot_token_id, cfg.eot_token_id, cfg.pad_token_id}))
    child = inherit_weights(pruned, cfg.replace(vocab_subset=narrower))
    rows = torch.tensor(narrower)
    assert torch.equal(child.text.token_embedding.weight, tiny_model.text.token_embedding.weight[rows])
    assert torch.equal(child.decoder.head, tiny_model.decoder.head[:, rows])
    with pytest.raises(InheritError, match="needs a vocab_subset"):
        inherit_weights(pruned, cfg)
    with pytest.raises(InheritError, match="does not have"):
        inherit_weights(pruned, cfg.replace(vocab_subset=tuple(sorted({*narrower, 40000}))))
    with pytest.raises(CheckpointError, match="no open_clip form"):
        save_open_clip(pruned, "/nonexistent/never-written.safetensors")


def test_pruned_losses_leave_out_what_the_student_cannot_predict():
    vocab = VocabSubset(torch.tensor([0, 3, 7]), 10, pruned=True)
    assert vocab.full and vocab.contains(torch.tensor([3, 4])).tolist() == [True, False]
    head = torch.randn(4, 3, requires_grad=True)
    logp = vocab.log_probs(torch.randn(2, 5, 4), head)
    assert logp.shape == (2, 5, 3)
    labels = torch.tensor([[3, 7, 4, 0, 0], [7, 7, 3, 3, 0]])
    total, count = caption_loss(logp, labels, vocab, pad_id=0)
    assert int(count) == 6 and torch.isfinite(total)  # token 4 is not in the vocabulary: left out
    # KD: a teacher top-k entry outside the subset joins the "other" bucket
    t_ids = torch.tensor([[[3, 4]] * 5] * 2)
    t_lp = torch.log(torch.tensor([[[0.6, 0.3]] * 5] * 2))
    kd, n = caption_kd_loss(logp, vocab, t_ids, t_lp, torch.ones(2, 5, dtype=torch.bool), temperature=1.0)
    assert torch.isfinite(kd) and float(kd.detach()) > 0
    kd.backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    # its minimum: the student puts 0.6 on token 3 and the rest (0.4) on its other tokens
    ideal = torch.log(torch.tensor([0.2, 0.6, 0.2])).expand(2, 5, 3)
    best, _ = caption_kd_loss(ideal, vocab, t_ids, t_lp, torch.ones(2, 5, dtype=torch.bool), temperature=1.0)
    assert float(best) == pytest.approx(0.0, abs=1e-6)


def test_train_with_data_vocabulary(tmp_path):
    cfg = TrainConfig.from_dict({
        "model": "test-tiny", "vocab": "data", "output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 4,
        "threads": 1, "log_every": 1, "save_every": 1, "data": {"train_size": 16, "max_text_len": 12},
        "eval": {"at_end": False}})
    result = train(cfg, progress=False)
    model = load_checkpoint(result.final_dir / "model.safetensors")
    subset = model.config.vocab_subset
    assert 10 < len(subset) < 200 and model.config.vocab_rows == len(subset)
    assert result.params == sum(p.numel() for p in model.parameters())
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    resumed = train(cfg.replace(steps=3), resume="latest", progress=False)
    assert resumed.step == 3
    with pytest.raises(Exception, match="vocab must be"):
        TrainConfig.from_dict({"vocab": "tiny"})
    # fine-tuning a full-vocabulary checkpoint with vocab: data prunes it to the same tokens
    full = CoCa(get_preset("test-tiny"))
    src = tmp_path / "full"
    src.mkdir()
    from safetensors.torch import save_file

    save_file(full.state_dict(), str(src / "model.safetensors"))
    (src / "config.json").write_text(full.config.to_json())
    tuned = train(cfg.replace(init=str(src / "model.safetensors"), output_dir=str(tmp_path / "tuned"), steps=1),
                  progress=False)
    assert load_checkpoint(tuned.final_dir / "model.safetensors").config.vocab_subset == subset


def test_pruned_bundle_exports_runs_and_quantizes(pruned, tmp_path):
    from coca_edge.exporters.bundle import export_bundle
    from coca_edge.quantize import Fp32Config, Int8DynamicConfig, quantize
    from coca_edge.quantize.methods import _producers
    from coca_edge.runtime import EdgeCoCa
    from coca_edge.runtime.edge import UnknownTokenWarning

    path = export_bundle(pruned, tmp_path / "pruned", progress=False)
    head = _producers(onnx.load(str(path / "decoder.onnx"), load_external_data=False), "logits")
    assert len(head) == 3  # Gather over the id space <- Pad with PRUNED_LOGIT <- the head MatMul
    runtime = EdgeCoCa.load(path)
    with pytest.warns(UnknownTokenWarning, match="does not have"):
        runtime.encode_text(["# $", "a red circle"])  # ids 1..299 are single characters, not words
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.encode_text(["# $", "\" #"])
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = greedy_generate(pruned, torch.from_numpy(pixels), max_new_tokens=15)
    out = runtime.caption_ids(pixels, max_new_tokens=15)
    for i, seq in enumerate(out.sequences):
        assert ref[i, 1:1 + len(seq)].tolist() == seq
    plan = {g: Fp32Config() for g in ("image_encoder", "text_encoder", "cross_kv")}
    plan["decoder"] = Int8DynamicConfig()
    q = quantize(path, plan, tmp_path / "q", progress=False)
    info = json.loads((q / "manifest.json").read_text())["graphs"]["decoder"]["quantization"]
    assert info["block_packed"] == head and info["kept_fp32"] == []  # the head is 8-bit blocks, the rest INT8
    q_out = EdgeCoCa.load(q).caption_ids(pixels, max_new_tokens=15)
    assert all(set(s) <= set(pruned.config.vocab_subset) for s in q_out.sequences)


def test_prune_vocab_cli(tmp_path, tiny_model, capsys):
    from safetensors.torch import save_file

    from coca_edge.cli import main

    src = tmp_path / "src"
    src.mkdir()
    save_file(tiny_model.state_dict(), str(src / "model.safetensors"))
    (src / "config.json").write_text(tiny_model.config.to_json())
    assert main(["prune-vocab", str(src / "model.safetensors"), "--out", str(tmp_path / "out"), "--samples", "200",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_after"] < summary["params_before"] / 5
    model = load_checkpoint(tmp_path / "out" / "model.safetensors")
    assert model.config.vocab_rows == summary["tokens"]
    assert main(["prune-vocab", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_validation_compares_logits_on_kept_tokens(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from coca_edge.validate import validate

    # Make the full model never predict a token outside KEEP: LayerNorm output has zero mean
    # over features, so with bias b*1 an all-(-1) head column has logit -b * width.
    with torch.no_grad():
        tiny_model.decoder.ln_final.weight.fill_(1.0)
        tiny_model.decoder.ln_final.bias.fill_(5.0)
        outside = torch.ones(tiny_model.config.vocab_size, dtype=torch.bool)
        outside[torch.tensor(prune_vocabulary(tiny_model, KEEP).config.vocab_subset)] = False
        tiny_model.decoder.head[:, outside] = -1.0
    paths = {}
    for name, model in (("full", tiny_model), ("pruned", prune_vocabulary(tiny_model, KEEP))):
        d = tmp_path / name
        d.mkdir()
        save_file(model.state_dict(), str(d / "model.safetensors"))
        (d / "config.json").write_text(model.config.to_json())
        paths[name] = d / "model.safetensors"
    report = validate(paths["full"], [paths["pruned"]], samples=16, latency=False, tensor_samples=4,
                      max_new_tokens=6, progress=False, out=tmp_path / "report")
    (cand,) = report.results
    assert cand.metrics["decoder.logits.max_abs"] < 1e-4  # not PRUNED_LOGIT against a real logit
    assert cand.metrics["image_encoder.image_embed.max_abs"] == 0
    assert cand.metrics["caption_exact_match"] == 1.0  # (class prompts use tokens outside KEEP: zero-shot differs)
    assert any("both models keep" in n for n in cand.notes)
    # models of different sizes: the size / fidelity frontier plot, in the HTML and as a file
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 1000
    assert 'alt="frontier"' in (tmp_path / "report" / "report.html").read_text()
