"""Reference greedy captioning in PyTorch, with and without the KV cache.

The deployable generation loop (greedy / beam / sampling) lives in the torch-free runtime;
this module is the PyTorch oracle it is tested against.
"""
from __future__ import annotations

import torch

from .coca import CoCa

__all__ = ["greedy_generate"]


@torch.no_grad()
def greedy_generate(model: CoCa, pixels: torch.Tensor, max_new_tokens: int = 20, min_new_tokens: int = 0,
                    use_cache: bool = True) -> torch.Tensor:
    """Return ``[B, 1 + n]`` ids: the start token, then greedy tokens, pad after each row's end token.

    ``min_new_tokens`` forbids the end token for the first tokens (open_clip's
    ``min_seq_len=5`` equals ``min_new_tokens=4``). ``use_cache=False`` re-runs the whole
    prefix every step, as open_clip's ``generate`` does.
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if 1 + max_new_tokens > cfg.context_length:
        raise ValueError(f"1 + max_new_tokens ({1 + max_new_tokens}) exceeds the context length {cfg.context_length}")
    _, image_tokens = model.encode_image(pixels)
    b = pixels.shape[0]
    out = torch.full((b, 1), cfg.sot_token_id, dtype=torch.long, device=pixels.device)
    done = torch.zeros(b, dtype=torch.bool, device=pixels.device)
    cache = model.empty_cache(image_tokens) if use_cache else None
    cross = None if use_cache else model.cross_kv(image_tokens)
    step_ids = out
    for step in range(max_new_tokens):
        if use_cache:
            logits, cache = model.decode_step(step_ids, cache)
        else:
            _, states = model.encode_text(out)
            logits = model.decoder(states, cross)
        logits = logits[:, -1].float()
        if step < min_new_tokens:
            logits[:, cfg.eot_token_id] = float("-inf")
        token = logits.argmax(dim=-1)
        token = torch.where(done, torch.full_like(token, cfg.pad_token_id), token)
        done = done | (token == cfg.eot_token_id)
        out = torch.cat([out, token[:, None]], dim=1)
        step_ids = token[:, None]
        if bool(done.all()):
            break
    return out
