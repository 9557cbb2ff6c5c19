from __future__ import annotations

import pytest
import torch

from coca_edge.models import CoCa, ContextLengthError, get_preset
from coca_edge.models.generate import greedy_generate

# FP32 on CPU: cached and full-recompute logits differ only by summation order (~1e-7 observed).
ATOL = 1e-5


def test_shapes(tiny_model, tiny_config, tiny_pixels):
    embed, tokens = tiny_model.encode_image(tiny_pixels)
    assert embed.shape == (3, tiny_config.embed_dim)
    assert tokens.shape == (3, tiny_config.vision.attn_pooler_queries - 1, tiny_config.embed_dim)
    assert torch.allclose(embed.norm(dim=-1), torch.ones(3))
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0]])
    text_embed, states = tiny_model.encode_text(ids)
    assert text_embed.shape == (1, tiny_config.embed_dim)
    assert states.shape == (1, 6, tiny_config.text.width)


def test_cache_layout(tiny_model, tiny_config, tiny_pixels):
    _, tokens = tiny_model.encode_image(tiny_pixels)
    cache = tiny_model.empty_cache(tokens)
    tc, dc = tiny_config.text, tiny_config.decoder
    assert cache.text.shape == (tc.layers, 2, 3, tc.heads, 0, tc.head_dim)
    assert cache.decoder.shape == (dc.layers, 2, 3, dc.heads, 0, dc.head_dim)
    assert cache.cross.shape == (dc.layers, 2, 3, dc.heads, tokens.shape[1], dc.head_dim)
    ids = torch.full((3, 1), tiny_config.sot_token_id)
    logits, cache = tiny_model.decode_step(ids, cache)
    assert logits.shape == (3, 1, tiny_config.vocab_size)
    assert cache.past_length == 1 and cache.decoder.shape[4] == 1


@torch.no_grad()
def test_cached_steps_equal_full_recompute(tiny_model, tiny_pixels):
    _, tokens = tiny_model.encode_image(tiny_pixels)
    g = torch.Generator().manual_seed(5)
    seq = torch.cat([torch.full((3, 1), 49406), torch.randint(1, 49406, (3, 24), generator=g)], dim=1)
    full = tiny_model.caption_logits(tokens, seq)
    cache = tiny_model.empty_cache(tokens)
    for t in range(seq.shape[1]):
        step, cache = tiny_model.decode_step(seq[:, t: t + 1], cache)
        err = (step[:, 0] - full[:, t]).abs().max().item()
        assert err < ATOL, f"step {t}: {err}"


@torch.no_grad()
def test_prefill_then_steps(tiny_model, tiny_pixels):
    """A past of length 0 with T new tokens (prefill), then single steps with a past of length T."""
    _, tokens = tiny_model.encode_image(tiny_pixels)
    seq = torch.randint(1, 49406, (3, 10), generator=torch.Generator().manual_seed(2))
    full = tiny_model.caption_logits(tokens, seq)
    logits, cache = tiny_model.decode_step(seq[:, :7], tiny_model.empty_cache(tokens))
    assert (logits - full[:, :7]).abs().max() < ATOL
    for t in range(7, 10):
        step, cache = tiny_model.decode_step(seq[:, t: t + 1], cache)
        assert (step[:, 0] - full[:, t]).abs().max() < ATOL


@torch.no_grad()
def test_training_forward_matches_decoder(tiny_model, tiny_pixels):
    """Teacher-forced logits of an unpadded caption equal the cached decode of the same prefix."""
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]] * 3)
    out = tiny_model(tiny_pixels, ids)
    assert out["logits"].shape == (3, 6, 49408)
    assert torch.equal(out["labels"], ids[:, 1:])
    _, tokens = tiny_model.encode_image(tiny_pixels)
    logits, _ = tiny_model.decode_step(ids[:, :-1], tiny_model.empty_cache(tokens))
    assert (logits - out["logits"]).abs().max() < ATOL


def test_greedy_cache_equals_no_cache(tiny_model, tiny_pixels):
    a = greedy_generate(tiny_model, tiny_pixels, max_new_tokens=25)
    b = greedy_generate(tiny_model, tiny_pixels, max_new_tokens=25, use_cache=False)
    assert a.shape[1] >= 2
    assert torch.equal(a, b)


def test_context_length_errors(tiny_model, tiny_pixels, tiny_config):
    too_long = torch.ones(1, tiny_config.context_length + 1, dtype=torch.long)
    with pytest.raises(ContextLengthError, match="context length is 76"):
        tiny_model.encode_text(too_long)
    _, tokens = tiny_model.encode_image(tiny_pixels[:1])
    cache = tiny_model.empty_cache(tokens)
    _, cache = tiny_model.decode_step(torch.ones(1, 76, dtype=torch.long), cache)
    with pytest.raises(ContextLengthError, match="exceeds"):
        tiny_model.decode_step(torch.ones(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="context length"):
        greedy_generate(tiny_model, tiny_pixels, max_new_tokens=80)


def test_every_parameter_initialised():
    torch.manual_seed(0)
    model = CoCa(get_preset("test-tiny"))
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if param.ndim >= 2:
            assert param.std() > 0, f"{name} is constant"


def test_gradients_reach_every_tower(tiny_model, tiny_pixels):
    tiny_model.train()
    ids = torch.tensor([[49406, 320, 1125, 49407, 0, 0]] * 3)
    out = tiny_model(tiny_pixels, ids)
    loss = out["logits"].logsumexp(-1).mean() + (out["image_features"] @ out["text_features"].T).sum()
    loss.backward()
    for name in ("visual.patch_embed.weight", "text.token_embedding.weight", "decoder.head",
                 "decoder.cross.0.kv.weight", "visual.pool.query"):
        grad = dict(tiny_model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_half_with_fp32_blocks_keeps_layernorm_and_head_fp32(tiny_config, tiny_pixels):
    """What an FP16 bundle computes, in real FP16 arithmetic: LayerNorm and the vocabulary
    head in FP32, everything else FP16; closer to FP32 than all-FP16 at the logits."""
    import copy

    from coca_edge.models.coca import LayerNorm, half_with_fp32_blocks

    torch.manual_seed(0)
    ref = CoCa(tiny_config).eval()
    mixed = half_with_fp32_blocks(copy.deepcopy(ref)).eval()
    pure = copy.deepcopy(ref).half().eval()
    norms = [m for m in mixed.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, LayerNorm) and m.weight.dtype == torch.float32 for m in norms)
    assert mixed.decoder.head.dtype == torch.float32 and mixed.visual.proj.dtype == torch.float16
    ids = torch.tensor([[tiny_config.sot_token_id, 5, 17, 250, 31, 7]] * 3)
    with torch.no_grad():
        want = ref(tiny_pixels, ids)["logits"]
        got_mixed = mixed(tiny_pixels.half(), ids)["logits"]
        got_pure = pure(tiny_pixels.half(), ids)["logits"]
    assert got_mixed.dtype == torch.float32 and got_pure.dtype == torch.float16
    err_mixed = (got_mixed - want).abs().max().item()
    err_pure = (got_pure.float() - want).abs().max().item()
    # real FP16 rounding, and not more of it than all-FP16: the two max errors are close and
    # their order depends on the CPU's FP16 kernels (Intel: mixed smaller; AMD EPYC: 0.0075 vs 0.0072)
    assert 0 < err_mixed <= 1.5 * err_pure
