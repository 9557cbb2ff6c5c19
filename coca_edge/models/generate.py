"""Reference greedy captioning in PyTorch, with and without the KV cache.

The deployable generation loop (greedy / beam / sampling) lives in the torch-free runtime;
this module is the PyTorch oracle it is tested against.
"""
from __future__ import annotations

import torch

from .coca import CoCa

__all__ = ["greedy_generate", "beam_search"]


@torch.no_grad()
def greedy_generate(model: CoCa, pixels: torch.Tensor, max_new_tokens: int = 20, min_new_tokens: int = 0,
                    use_cache: bool = True, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``[B, 1 + n]`` ids: the start token, then greedy tokens, pad after each row's end token.

    ``min_new_tokens`` forbids the end token for the first tokens (open_clip's
    ``min_seq_len=5`` equals ``min_new_tokens=4``). ``use_cache=False`` re-runs the whole
    prefix every step, as open_clip's ``generate`` does. ``image_tokens``: the output of
    ``model.encode_image(pixels)[1]`` when the caller already has it.
    """
    cfg = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if 1 + max_new_tokens > cfg.context_length:
        raise ValueError(f"1 + max_new_tokens ({1 + max_new_tokens}) exceeds the context length {cfg.context_length}")
    if image_tokens is None:
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


@torch.no_grad()
def beam_search(model: CoCa, pixels: torch.Tensor, num_beams: int = 3, max_new_tokens: int = 20,
                min_new_tokens: int = 0, length_penalty: float = 1.0) -> list[list[int]]:
    """Reference beam search: full recompute of the prefix every step, one image at a time.

    Same search rule as the runtime's (score = summed log-probability / tokens ** length_penalty;
    the 2 * num_beams best continuations ranked with ties to the smaller index; an end token
    ranked within the first num_beams closes a hypothesis; done at num_beams closed ones).
    Returns per image the generated ids without the start token.
    """
    cfg = model.config
    _, image_tokens = model.encode_image(pixels)
    results = []
    for b in range(pixels.shape[0]):
        cross = model.cross_kv(image_tokens[b: b + 1].expand(num_beams, -1, -1))
        beams = [[cfg.sot_token_id] for _ in range(num_beams)]
        scores = torch.full((num_beams,), -1e9, dtype=torch.float64)
        scores[0] = 0.0
        hyps: list[tuple[float, list[int]]] = []
        finished = False
        for step in range(max_new_tokens):
            _, states = model.encode_text(torch.tensor(beams))
            logp = torch.log_softmax(model.decoder(states, cross)[:, -1].double(), dim=-1)
            if step < min_new_tokens:
                logp[:, cfg.eot_token_id] = float("-inf")
            vocab = logp.shape[-1]
            flat = (scores[:, None] + logp).reshape(-1)
            order = _topk_stable(flat, min(2 * num_beams, flat.numel()))
            new_beams, new_scores = [], []
            for rank, i in enumerate(order):
                beam, token, score = i // vocab, i % vocab, flat[i].item()
                if token == cfg.eot_token_id:
                    if rank < num_beams:
                        hyps.append((score / (step + 1) ** length_penalty, beams[beam][1:] + [token]))
                    continue
                new_beams.append(beams[beam] + [token])
                new_scores.append(score)
                if len(new_beams) == num_beams:
                    break
            beams, scores = new_beams, torch.tensor(new_scores, dtype=torch.float64)
            if len(hyps) >= num_beams:
                finished = True
                break
        if not finished:
            hyps += [(scores[k].item() / max_new_tokens ** length_penalty, beams[k][1:]) for k in range(num_beams)]
        results.append(max(hyps, key=lambda h: h[0])[1])
    return results


def _topk_stable(flat: torch.Tensor, k: int) -> list[int]:
    # candidates: anything >= the k-th largest value, then exact (value desc, index asc) order
    kth = torch.topk(flat, k).values[-1]
    idx = torch.nonzero(flat >= kth).flatten().tolist()
    return sorted(idx, key=lambda i: (-flat[i].item(), i))[:k]
