"""Levers for the batch-8 caption time, each measured against what ships (not a test).

    python benchmarks/decode_levers.py [--sections steps,crosskv,cross,matmul,spinning] [--threads 2]

Five comparisons on ``coca_ViT-B-32`` (random weights), ORT CPU FP32, medians of
interleaved blocks, each printed as a ratio against the shipped choice:

* ``steps``: the whole decode step (batch 1 and 8, 15 cached tokens) for three decoder
  graphs exported from the same weights: the shipped one (``present = concat(past, new)``);
  *absorbed* cross-attention (the K/V projections folded into the query and output side, so
  the decoder reads the normalised image tokens once, shared by every layer, instead of
  per-layer K/V - no ``cross_kv`` graph at all); and a *pre-allocated cache* (per-layer
  buffers of a fixed length fed in place, a ``past_length`` input masks the unfilled slots,
  the graph returns only the new K/V - no copy of the cache per step).
* ``crosskv``: the cross-K/V graph as shipped (all layers as one broadcast MatMul, the
  LayerNorm computed once with each layer's scale and shift folded into its weights, the
  output already in its layout) against the model's own per-layer form (LayerNorm, MatMul,
  Transpose per layer, then a Concat).
* ``cross``: cross-attention alone (12 layers, batch 8, 255 image tokens) in seven
  formulations, including ONNX Runtime's contrib ``MultiHeadAttention`` and uint8 K/V read
  through ``MatMulInteger`` (what an INT8 cross-K/V cache would cost a step).
* ``matmul``: the weight matmuls alone (50 MLP blocks 512-2048-512) as ``MatMul`` (shipped),
  ``Gemm(transB=1)`` and with transposed activations, at M = 1 and 8.
* ``spinning``: end-to-end captioning (batch 1 and 8, 30 tokens forced) with ORT's worker
  threads spinning during a run and stopping when it returns (shipped), spinning on after
  a run (ORT's default: the workers of one graph's session keep spinning while the next
  graph runs), or not spinning at all.

Sessions in the first three sections run alternately; as shipped, their workers spin during
a run and stop when it returns. With ORT's default (keep spinning) a worker of the idle
session takes a core from the running one (seen: the same batch-8 step at 61 ms instead of
37 ms). Writes benchmarks/results/decode_levers.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _session(model, threads: int, spin: str = "stop"):
    """``spin``: "off" (no spinning), "on" (ORT's default) or "stop" (spin during a run, stop when it returns)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if spin == "stop":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin == "on" else "0")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _interleaved(fns: dict, rounds: int = 7, inner: int = 5) -> dict[str, float]:
    """Median seconds per call; each round times ``inner`` calls of every function in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def _table(title: str, medians: dict[str, float], reference: str, extra: dict[str, str] | None = None) -> None:
    print(f"\n{title}")
    for name, t in medians.items():
        note = f"  {extra[name]}" if extra and name in extra else ""
        print(f"  {name:<44}{t * 1e3:8.2f} ms   {medians[reference] / t:5.2f}x of shipped{note}")


def _export(spec, model, dummy: dict, tmp: Path, threads: int):
    """Export ``spec``'s module of ``model`` (dynamo, opset 18) into ``tmp`` and open a session."""
    import torch

    from coca_edge.exporters.onnx import _export_one, _export_patches, _finalize

    raw, path = tmp / f"{spec.name}-raw.onnx", tmp / f"{spec.name}.onnx"
    with _export_patches(), torch.no_grad():
        _export_one(spec.build(model).eval(), spec, dummy, raw, 18, "dynamo")
    _finalize(raw, path)
    return _session(path, threads)


# -- section 1: whole decode-step variants ------------------------------------------------
def _variant_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from coca_edge.models.coca import _merge_heads, _step_mask, stack_layers

    class Absorbed(nn.Module):
        """Cross-attention with K/V projections absorbed (exact: the dropped terms are constant
        over keys, so softmax ignores them, or sum to a bias because the weights sum to 1)."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            dc = model.config.decoder
            h, d, e = dc.heads, dc.head_dim, dc.width
            ak, av, c = [], [], []
            for blk in model.decoder.cross:
                w, bias = blk.kv.weight.detach(), blk.kv.bias.detach()
                g, b = blk.ln_1_kv.weight.detach(), blk.ln_1_kv.bias.detach()
                ak.append((w[:e] * g).view(h, d, e) * d ** -0.5)
                av.append((w[e:] * g).view(h, d, e).transpose(1, 2).contiguous())
                c.append(w[e:] @ b + bias[e:])
            self.ak = nn.Parameter(torch.stack(ak))
            self.av = nn.Parameter(torch.stack(av))
            self.c = nn.Parameter(torch.stack(c))

        def forward(self, input_ids, past_text, past_decoder, states, states_t):
            m = self.model
            x, present_text = m.text.forward_cached(input_ids, past_text)
            bsz, s, e = x.shape
            h = self.ak.shape[1]
            d = e // h
            mask = _step_mask(past_decoder.shape[4], s, x.device)
            present = []
            for i, (blk, xb) in enumerate(zip(m.decoder.blocks, m.decoder.cross)):
                x, k, v = blk(x, mask=mask, past=past_decoder[i])
                present.append(torch.stack([k, v]))
                q = xb.q(xb.ln_1(x)).view(bsz * s, h, d).transpose(0, 1)            # [H, B*S, D]
                qa = torch.matmul(q, self.ak[i]).view(h, bsz, s, e).permute(1, 0, 2, 3).reshape(bsz, h * s, e)
                p = torch.matmul(qa, states_t).softmax(dim=-1)                      # [B, H*S, N]
                ctx = torch.matmul(p, states).view(bsz, h, s, e).permute(1, 0, 2, 3).reshape(h, bsz * s, e)
                o = torch.matmul(ctx, self.av[i]).transpose(0, 1).reshape(bsz, s, h * d) + self.c[i]
                x = x + xb.out(o)
                x = x + xb.mlp(xb.ln_2(x))
            return m.decoder.ln_final(x) @ m.decoder.head, stack_layers(present_text), torch.stack(present)

    def attend_buffer(attn, x, past_k, past_v, n_valid):
        b, s, w = x.shape
        qkv = attn.qkv(x).view(b, s, 3, attn.heads, w // attn.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        qt = q.transpose(-1, -2) * q.shape[-1] ** -0.5
        slots = past_k.shape[2]
        valid = (torch.arange(slots) < n_valid).view(slots, 1)
        s_past = torch.matmul(past_k, qt).masked_fill(~valid, float("-inf"))      # [B, H, P, S]
        causal = torch.ones(s, s, dtype=torch.bool).tril().transpose(0, 1)       # [key, query]
        s_new = torch.matmul(k, qt).masked_fill(~causal, float("-inf"))
        p = torch.cat([s_past, s_new], dim=2).softmax(dim=2)
        o = torch.matmul(p[:, :, :slots].transpose(-1, -2), past_v) + torch.matmul(p[:, :, slots:].transpose(-1, -2), v)
        return attn.out(_merge_heads(o)), k, v

    class Preallocated(nn.Module):
        """Per-layer cache buffers of a fixed length, read in place; returns only the new K/V."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, past_length, *buffers):
            m = self.model
            lt, ld = len(m.text.blocks), len(m.decoder.blocks)
            tb, db, cross = buffers[:2 * lt], buffers[2 * lt:2 * (lt + ld)], buffers[2 * (lt + ld):]
            pos = torch.arange(input_ids.shape[1]) + past_length
            x = m.text.token_embedding(input_ids) + F.embedding(pos, m.text.pos_embed)
            new_text, new_dec = [], []
            for i, blk in enumerate(m.text.blocks):
                a, k, v = attend_buffer(blk.attn, blk.ln_1(x), tb[2 * i], tb[2 * i + 1], past_length)
                x = x + a
                x = x + blk.mlp(blk.ln_2(x))
                new_text.append(torch.stack([k, v]))
            for i, (blk, xb) in enumerate(zip(m.decoder.blocks, m.decoder.cross)):
                a, k, v = attend_buffer(blk.attn, blk.ln_1(x), db[2 * i], db[2 * i + 1], past_length)
                x = x + a
                x = x + blk.mlp(blk.ln_2(x))
                new_dec.append(torch.stack([k, v]))
                x = xb(x, (cross[2 * i], cross[2 * i + 1]), step=True)
            return m.decoder.ln_final(x) @ m.decoder.head, torch.stack(new_text), torch.stack(new_dec)

    return Absorbed, Preallocated


def section_steps(args, tmp: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from coca_edge.exporters.specs import GraphSpec, TensorSpec, cross_input_names, get_spec, split_cross
    from coca_edge.models import CoCa, get_preset

    Absorbed, Preallocated = _variant_modules()
    torch.manual_seed(args.seed)
    config = get_preset(args.preset)
    model = CoCa(config).eval()
    tc, dc, n, e = config.text, config.decoder, config.vision.num_image_tokens, config.embed_dim
    logits = TensorSpec("logits", "float32", ("batch", "seq", config.vocab_size))
    text_cache = ("batch", tc.heads, "past", tc.head_dim)
    dec_cache = ("batch", dc.heads, "past", dc.head_dim)
    specs = {
        "shipped (concat cache, per-layer cross K/V)": get_spec(config, "decoder"),
        "absorbed cross-attention": GraphSpec(
            "absorbed", (TensorSpec("input_ids", "int64", ("batch", "seq")),
                         TensorSpec("past_text", "float32", (tc.layers, 2, *text_cache)),
                         TensorSpec("past_decoder", "float32", (dc.layers, 2, *dec_cache)),
                         TensorSpec("states", "float32", ("batch", n, e)),
                         TensorSpec("states_t", "float32", ("batch", e, n))),
            (logits, TensorSpec("present_text", "float32", ("t",)), TensorSpec("present_decoder", "float32", ("d",))),
            Absorbed),
        "pre-allocated cache (new K/V out only)": GraphSpec(
            "preallocated", (TensorSpec("input_ids", "int64", ("batch", "seq")), TensorSpec("past_length", "int64", ()),
                             *(TensorSpec(f"text_{kv}_{i}", "float32", text_cache)
                               for i in range(tc.layers) for kv in "kv"),
                             *(TensorSpec(f"dec_{kv}_{i}", "float32", dec_cache) for i in range(dc.layers) for kv in "kv"),
                             *(TensorSpec(name, "float32", ("batch", dc.heads, n, dc.head_dim))
                               for name in cross_input_names(dc.layers))),
            (logits, TensorSpec("new_text", "float32", ("t",)), TensorSpec("new_decoder", "float32", ("d",))),
            Preallocated),
    }
    # one set of realistic inputs: image tokens and a 15-token cache from the model itself
    past, slots, batch = 15, 31, 8
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        _, tokens = model.encode_image(torch.randn(batch, 3, config.vision.image_size, config.vision.image_size,
                                                   generator=g).clamp(-2, 2))
        cache = model.empty_cache(tokens)
        _, cache = model.decode_step(torch.randint(1, 40000, (batch, past), generator=g), cache)
    ids = torch.randint(1, 40000, (batch, 1), generator=g).numpy()
    cross = cache.cross.numpy()
    states = F.layer_norm(tokens, (e,), eps=1e-5).numpy()
    pt, pd = cache.text.numpy(), cache.decoder.numpy()
    text_buf = np.zeros(pt.shape[:4] + (slots, pt.shape[5]), np.float32)
    dec_buf = np.zeros(pd.shape[:4] + (slots, pd.shape[5]), np.float32)
    text_buf[..., :past, :], dec_buf[..., :past, :] = pt, pd
    feeds = {
        "shipped (concat cache, per-layer cross K/V)": {"input_ids": ids, "past_text": pt, "past_decoder": pd,
                                                        **split_cross(cross, dc.layers)},
        "absorbed cross-attention": {"input_ids": ids, "past_text": pt, "past_decoder": pd, "states": states,
                                     "states_t": np.ascontiguousarray(states.transpose(0, 2, 1))},
        "pre-allocated cache (new K/V out only)": {
            "input_ids": ids, "past_length": np.array(past, np.int64),
            **{f"text_{kv}_{i}": text_buf[i, j] for i in range(tc.layers) for j, kv in enumerate("kv")},
            **{f"dec_{kv}_{i}": dec_buf[i, j] for i in range(dc.layers) for j, kv in enumerate("kv")},
            **split_cross(cross, dc.layers)},
    }
    sessions = {}
    for label, spec in specs.items():
        print(f"exporting {label} ...", flush=True)
        # (np.ascontiguousarray would turn the 0-d past_length into 1-d)
        dummy = {k: torch.from_numpy(v.copy() if v.ndim == 0 else np.ascontiguousarray(v[:, :, :2] if v.ndim == 6 else v[:2]))
                 for k, v in feeds[label].items()}
        dummy["input_ids"] = torch.from_numpy(ids[:2]).repeat(1, 3)
        sessions[label] = _export(spec, model, dummy, tmp, args.threads)
    shipped = next(iter(specs))
    reference = sessions[shipped].run(["logits"], feeds[shipped])[0]
    results = {}
    for b in (1, 8):
        def cut(name, v):
            if v.ndim == 0:
                return v
            return np.ascontiguousarray(v[:, :, :b] if name.startswith("past_") else v[:b])
        fb = {label: {k: cut(k, v) for k, v in feed.items()} for label, feed in feeds.items()}
        diffs = {label: float(np.abs(sessions[label].run(["logits"], fb[label])[0] - reference[:b]).max())
                 for label in specs}
        med = _interleaved({label: (lambda s=sessions[label], f=fb[label]: s.run(None, f)) for label in specs})
        _table(f"decode step, batch {b}, {past} cached tokens (pre-allocated: {slots} slots)", med, shipped,
               {label: f"logits max |diff| vs shipped {diffs[label]:.1e}" for label in specs})
        results[f"batch {b}"] = {"median_s": med, "max_abs_logits_diff": diffs}
    return results


# -- section 1b: the cross-K/V graph ---------------------------------------------------
def section_crosskv(args, tmp: Path) -> dict:
    import torch

    from coca_edge.exporters.specs import GraphSpec, _ModelCrossKV, get_spec
    from coca_edge.models import CoCa, get_preset

    torch.manual_seed(args.seed)
    config = get_preset(args.preset)
    model = CoCa(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias parameters, so the folding is exercised
        for blk in model.decoder.cross:
            blk.ln_1_kv.weight.uniform_(0.5, 1.5), blk.ln_1_kv.bias.normal_(0, 0.1), blk.kv.bias.normal_(0, 0.1)
    shipped = get_spec(config, "cross_kv")
    specs = {"one broadcast MatMul (shipped)": shipped,
             "per layer: LayerNorm, MatMul, Transpose; Concat": GraphSpec("cross_per_layer", shipped.inputs,
                                                                          shipped.outputs, _ModelCrossKV)}
    tokens = torch.randn(8, config.vision.num_image_tokens, config.embed_dim, generator=torch.Generator().manual_seed(2))
    sessions = {label: _export(spec, model, {"image_tokens": tokens[:2]}, tmp, args.threads)
                for label, spec in specs.items()}
    results = {}
    for b in (1, 8):
        feed = {"image_tokens": tokens[:b].numpy()}
        ref = sessions[next(iter(specs))].run(None, feed)[0]
        notes = {k: f"max |diff| vs shipped {np.abs(s.run(None, feed)[0] - ref).max():.1e}" for k, s in sessions.items()}
        med = _interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, inner=2)
        _table(f"cross K/V graph, batch {b}", med, next(iter(specs)), notes)
        results[f"batch {b}"] = {"median_s": med}
    return results


# -- section 2: cross-attention formulations ----------------------------------------------
def _cross_graph(kind: str, b: int, h: int, n: int, d: int, layers: int, rng) -> bytes:
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    f, e = TP.FLOAT, h * d
    inputs = [oh.make_tensor_value_info("q", f, [b, h, 1, d])]
    inits = [oh.make_tensor("scale", f, [], [d ** -0.5]), oh.make_tensor("shape_q3", TP.INT64, [3], [b, 1, e]),
             oh.make_tensor("shape_o4", TP.INT64, [4], [b, 1, h, d]), oh.make_tensor("shape_hbd", TP.INT64, [3], [h, b, d]),
             oh.make_tensor("shape_bh1d", TP.INT64, [4], [b, h, 1, d])]
    nodes, x = [], "q"
    layout_k = [b, h, d, n] if kind in ("q @ K^T, K stored [B,H,D,N]", "q @ K^T and V^T @ p^T") else [b, h, n, d]
    layout_v = [b, h, d, n] if kind in ("K @ q^T and V^T @ p^T", "q @ K^T and V^T @ p^T") else [b, h, n, d]
    if kind == "absorbed (shared normalised tokens)":
        inputs += [oh.make_tensor_value_info("tok", f, [b, n, e]), oh.make_tensor_value_info("tokT", f, [b, e, n])]
    for i in range(layers):
        k, v, o = f"k{i}", f"v{i}", f"o{i}"
        if kind != "absorbed (shared normalised tokens)":
            kv_type = TP.UINT8 if kind == INT8_KIND else f
            inputs += [oh.make_tensor_value_info(k, kv_type, layout_k), oh.make_tensor_value_info(v, kv_type, layout_v)]
        if kind == "K @ q^T (shipped)":
            nodes += [oh.make_node("Transpose", [x], [f"qt{i}"], perm=[0, 1, 3, 2]),
                      oh.make_node("MatMul", [k, f"qt{i}"], [f"s{i}"]), oh.make_node("Mul", [f"s{i}", "scale"], [f"z{i}"]),
                      oh.make_node("Softmax", [f"z{i}"], [f"p{i}"], axis=2),
                      oh.make_node("Transpose", [f"p{i}"], [f"pt{i}"], perm=[0, 1, 3, 2]),
                      oh.make_node("MatMul", [f"pt{i}", v], [o])]
        elif kind == "q @ K^T, K stored [B,H,D,N]":
            nodes += [oh.make_node("MatMul", [x, k], [f"s{i}"]), oh.make_node("Mul", [f"s{i}", "scale"], [f"z{i}"]),
                      oh.make_node("Softmax", [f"z{i}"], [f"p{i}"], axis=-1), oh.make_node("MatMul", [f"p{i}", v], [o])]
        elif kind == "K @ q^T and V^T @ p^T":
            nodes += [oh.make_node("Transpose", [x], [f"qt{i}"], perm=[0, 1, 3, 2]),
                      oh.make_node("MatMul", [k, f"qt{i}"], [f"s{i}"]), oh.make_node("Mul", [f"s{i}", "scale"], [f"z{i}"]),
                      oh.make_node("Softmax", [f"z{i}"], [f"p{i}"], axis=2),
                      oh.make_node("MatMul", [v, f"p{i}"], [f"ot{i}"]),
                      oh.make_node("Transpose", [f"ot{i}"], [o], perm=[0, 1, 3, 2])]
        elif kind == "q @ K^T and V^T @ p^T":
            nodes += [oh.make_node("MatMul", [x, k], [f"s{i}"]), oh.make_node("Mul", [f"s{i}", "scale"], [f"z{i}"]),
                      oh.make_node("Softmax", [f"z{i}"], [f"p{i}"], axis=-1),
                      oh.make_node("Transpose", [f"p{i}"], [f"pt{i}"], perm=[0, 1, 3, 2]),
                      oh.make_node("MatMul", [v, f"pt{i}"], [f"ot{i}"]),
                      oh.make_node("Transpose", [f"ot{i}"], [o], perm=[0, 1, 3, 2])]
        elif kind == "contrib MultiHeadAttention":
            nodes += [oh.make_node("Transpose", [x], [f"qb{i}"], perm=[0, 2, 1, 3]),
                      oh.make_node("Reshape", [f"qb{i}", "shape_q3"], [f"qr{i}"]),
                      oh.make_node("MultiHeadAttention", [f"qr{i}", k, v], [f"m{i}"], domain="com.microsoft", num_heads=h),
                      oh.make_node("Reshape", [f"m{i}", "shape_o4"], [f"mo{i}"]),
                      oh.make_node("Transpose", [f"mo{i}"], [o], perm=[0, 2, 1, 3])]
        elif kind == INT8_KIND:
            # K and V stored as uint8 with one scale / zero point per layer (from calibration);
            # the query and the softmax output are quantized per run, scores and output come
            # from integer matmuls and are scaled back.
            inputs += [oh.make_tensor_value_info(f"ks{i}", f, []), oh.make_tensor_value_info(f"kz{i}", TP.UINT8, []),
                       oh.make_tensor_value_info(f"vs{i}", f, []), oh.make_tensor_value_info(f"vz{i}", TP.UINT8, [])]
            nodes += [oh.make_node("Transpose", [x], [f"qt{i}"], perm=[0, 1, 3, 2]),
                      oh.make_node("DynamicQuantizeLinear", [f"qt{i}"], [f"qq{i}", f"qs{i}", f"qz{i}"]),
                      oh.make_node("MatMulInteger", [k, f"qq{i}", f"kz{i}", f"qz{i}"], [f"si{i}"]),
                      oh.make_node("Cast", [f"si{i}"], [f"sf{i}"], to=f),
                      oh.make_node("Mul", [f"qs{i}", f"ks{i}"], [f"m1{i}"]),
                      oh.make_node("Mul", [f"m1{i}", "scale"], [f"m2{i}"]),
                      oh.make_node("Mul", [f"sf{i}", f"m2{i}"], [f"z{i}"]),
                      oh.make_node("Softmax", [f"z{i}"], [f"p{i}"], axis=2),
                      oh.make_node("Transpose", [f"p{i}"], [f"pt{i}"], perm=[0, 1, 3, 2]),
                      oh.make_node("DynamicQuantizeLinear", [f"pt{i}"], [f"pq{i}", f"ps{i}", f"pz{i}"]),
                      oh.make_node("MatMulInteger", [f"pq{i}", v, f"pz{i}", f"vz{i}"], [f"oi{i}"]),
                      oh.make_node("Cast", [f"oi{i}"], [f"of{i}"], to=f),
                      oh.make_node("Mul", [f"ps{i}", f"vs{i}"], [f"m3{i}"]),
                      oh.make_node("Mul", [f"of{i}", f"m3{i}"], [o])]
        else:  # absorbed: per-head query folded with W_k, output with W_v; tokens shared by all layers
            inits += [nh.from_array(rng.standard_normal((h, d, e), np.float32) * 0.05, f"ak{i}"),
                      nh.from_array(rng.standard_normal((h, e, d), np.float32) * 0.05, f"av{i}")]
            nodes += [oh.make_node("Transpose", [x], [f"qh{i}"], perm=[1, 0, 2, 3]),
                      oh.make_node("Reshape", [f"qh{i}", "shape_hbd"], [f"q2{i}"]),
                      oh.make_node("MatMul", [f"q2{i}", f"ak{i}"], [f"qa{i}"]),
                      oh.make_node("Transpose", [f"qa{i}"], [f"qb{i}"], perm=[1, 0, 2]),
                      oh.make_node("MatMul", [f"qb{i}", "tokT"], [f"s{i}"]),
                      oh.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1),
                      oh.make_node("MatMul", [f"p{i}", "tok"], [f"c{i}"]),
                      oh.make_node("Transpose", [f"c{i}"], [f"ct{i}"], perm=[1, 0, 2]),
                      oh.make_node("MatMul", [f"ct{i}", f"av{i}"], [f"oh{i}"]),
                      oh.make_node("Transpose", [f"oh{i}"], [f"ot{i}"], perm=[1, 0, 2]),
                      oh.make_node("Reshape", [f"ot{i}", "shape_bh1d"], [o])]
        nodes.append(oh.make_node("Add", [x, o], [f"x{i}"]))  # the next layer's query depends on this one
        x = f"x{i}"
    graph = oh.make_graph(nodes, "cross", inputs, [oh.make_tensor_value_info(x, f, [b, h, 1, d])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


INT8_KIND = "uint8 K/V, MatMulInteger"
CROSS_KINDS = ("K @ q^T (shipped)", "q @ K^T, K stored [B,H,D,N]", "K @ q^T and V^T @ p^T", "q @ K^T and V^T @ p^T",
               "contrib MultiHeadAttention", INT8_KIND, "absorbed (shared normalised tokens)")


def quantize_u8(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 over the whole tensor (range widened to hold 0): values, scale, zero point."""
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = int(np.clip(round(-lo / scale), 0, 255))
    q = np.clip(np.round(a / scale) + zero, 0, 255).astype(np.uint8)
    return q, np.array(scale, np.float32), np.array(zero, np.uint8)


def section_cross(args, tmp: Path) -> dict:
    b, h, n, d, layers = 8, 8, 255, 64, 12
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((b, h, n, d), np.float32) for _ in range(layers)]
    values = [rng.standard_normal((b, h, n, d), np.float32) for _ in range(layers)]
    q = rng.standard_normal((b, h, 1, d), np.float32)
    tok = rng.standard_normal((b, n, h * d), np.float32)
    sessions, feeds = {}, {}
    for kind in CROSS_KINDS:
        sessions[kind] = _session(_cross_graph(kind, b, h, n, d, layers, np.random.default_rng(1)), args.threads)
        feed = {"q": q}
        if kind.startswith("absorbed"):
            feed.update(tok=tok, tokT=np.ascontiguousarray(tok.transpose(0, 2, 1)))
        else:
            for i in range(layers):
                if kind == INT8_KIND:
                    feed[f"k{i}"], feed[f"ks{i}"], feed[f"kz{i}"] = quantize_u8(keys[i])
                    feed[f"v{i}"], feed[f"vs{i}"], feed[f"vz{i}"] = quantize_u8(values[i])
                    continue
                kt = kind in ("q @ K^T, K stored [B,H,D,N]", "q @ K^T and V^T @ p^T")
                vt = kind in ("K @ q^T and V^T @ p^T", "q @ K^T and V^T @ p^T")
                feed[f"k{i}"] = np.ascontiguousarray(keys[i].transpose(0, 1, 3, 2)) if kt else keys[i]
                feed[f"v{i}"] = np.ascontiguousarray(values[i].transpose(0, 1, 3, 2)) if vt else values[i]
        feeds[kind] = feed
    reference = sessions[CROSS_KINDS[0]].run(None, feeds[CROSS_KINDS[0]])[0]
    notes = {}
    for kind in CROSS_KINDS[1:-1]:  # the absorbed graph has its own (random) weights
        out = sessions[kind].run(None, feeds[kind])[0]
        notes[kind] = f"max |diff| vs shipped {np.abs(out - reference).max():.1e}"
        if kind == INT8_KIND:
            cos = float((out * reference).sum() / np.linalg.norm(out) / np.linalg.norm(reference))
            notes[kind] += f", cosine {cos:.6f}"
    med = _interleaved({k: (lambda s=sessions[k], f=feeds[k]: s.run(None, f)) for k in CROSS_KINDS})
    mb = 2 * layers * b * h * n * d * 4 / 1e6
    for k in CROSS_KINDS[:-1]:
        read = mb / 4 if k == INT8_KIND else mb
        notes[k] = f"{read / 1e3 / med[k]:.1f} GB/s of image K/V" + (f"; {notes[k]}" if k in notes else "")
    _table(f"cross-attention alone: {layers} layers, batch {b}, {n} image tokens ({mb:.0f} MB of K/V)",
           med, CROSS_KINDS[0], notes)
    return {"median_s": med}


# -- section 3: weight-matmul layouts -----------------------------------------------------
def _mlp_graph(kind: str, m: int, w1: list, w2: list) -> bytes:
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    nodes, inits, x = [], [], "x"
    for i, (a, b) in enumerate(zip(w1, w2)):
        if kind == "MatMul x @ W (shipped)":
            inits += [nh.from_array(a, f"w1_{i}"), nh.from_array(b, f"w2_{i}")]
            nodes += [oh.make_node("MatMul", [x, f"w1_{i}"], [f"a{i}"]), oh.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                      oh.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"b{i}"])]
        else:
            inits += [nh.from_array(np.ascontiguousarray(a.T), f"w1_{i}"), nh.from_array(np.ascontiguousarray(b.T), f"w2_{i}")]
            if kind == "Gemm(transB=1)":
                nodes += [oh.make_node("Gemm", [x, f"w1_{i}"], [f"a{i}"], transB=1),
                          oh.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                          oh.make_node("Gemm", [f"r{i}", f"w2_{i}"], [f"b{i}"], transB=1)]
            else:  # activations kept as [E, M]: y^T = W^T x^T
                nodes += [oh.make_node("MatMul", [f"w1_{i}", x], [f"a{i}"]), oh.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                          oh.make_node("MatMul", [f"w2_{i}", f"r{i}"], [f"b{i}"])]
        nodes.append(oh.make_node("Add", [x, f"b{i}"], [f"x{i}"]))
        x = f"x{i}"
    e = w1[0].shape[0]
    shape = [e, m] if kind.startswith("transposed") else [m, e]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TP.FLOAT, shape)],
                          [oh.make_tensor_value_info(x, TP.FLOAT, shape)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


MATMUL_KINDS = ("MatMul x @ W (shipped)", "Gemm(transB=1)", "transposed activations W^T @ x^T")


def section_matmul(args, tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    layers, e, hidden = 50, 512, 2048
    w1 = [rng.standard_normal((e, hidden), np.float32) * 0.02 for _ in range(layers)]
    w2 = [rng.standard_normal((hidden, e), np.float32) * 0.02 for _ in range(layers)]
    mb = layers * 2 * e * hidden * 4 / 1e6
    results = {}
    for m in (1, 8):
        x = rng.standard_normal((m, e), np.float32)
        sessions = {k: _session(_mlp_graph(k, m, w1, w2), args.threads) for k in MATMUL_KINDS}
        feeds = {k: {"x": np.ascontiguousarray(x.T) if k.startswith("transposed") else x} for k in MATMUL_KINDS}
        med = _interleaved({k: (lambda s=sessions[k], f=feeds[k]: s.run(None, f)) for k in MATMUL_KINDS})
        _table(f"weight matmuls alone: {layers} MLP blocks {e}-{hidden}-{e} ({mb:.0f} MB), M = {m}", med,
               MATMUL_KINDS[0], {k: f"{mb / 1e3 / med[k]:.1f} GB/s" for k in MATMUL_KINDS})
        results[f"M={m}"] = {"median_s": med}
    return results


# -- section 4: thread spinning, end to end -----------------------------------------------
def section_spinning(args, tmp: Path) -> dict:
    import torch

    from coca_edge.exporters.bundle import export_bundle
    from coca_edge.models import CoCa, get_preset
    from coca_edge.runtime import EdgeCoCa

    bundle = Path(args.bundle) if args.bundle else tmp / "bundle"
    if not bundle.exists():
        torch.manual_seed(args.seed)
        export_bundle(CoCa(get_preset(args.preset)).eval(), bundle, progress=False,
                      source_model={"preset": args.preset, "weights": f"random(seed={args.seed})"})
    runtimes = {}
    for label, spin in (("spin, stop when a run returns (shipped)", "stop"), ("spin, keep spinning (ORT default)", "on"),
                        ("no spinning", "off")):
        rt = EdgeCoCa.load(bundle, threads=args.threads, verify_hashes=False)
        if spin != "stop":  # "stop" is what OrtRunner sets: measure its sessions as they are
            for runner in rt.runners.values():
                runner.session = _session(runner.path, args.threads, spin=spin)
        runtimes[label] = rt
    size = next(iter(runtimes.values())).image_size
    results = {}
    for b in (1, 8):
        pixels = np.clip(np.random.default_rng(b).standard_normal((b, 3, size, size), np.float32), -2, 2)
        fns = {label: (lambda rt=rt: rt.caption_ids(pixels, max_new_tokens=30, min_new_tokens=30, batch_size=b))
               for label, rt in runtimes.items()}
        med = _interleaved(fns, rounds=7 if b == 1 else 5, inner=1)
        _table(f"end-to-end captioning, batch {b}, 30 tokens forced", med, next(iter(med)))
        results[f"batch {b}"] = {"median_s": med}
    return results


SECTIONS = {"steps": section_steps, "crosskv": section_crosskv, "cross": section_cross, "matmul": section_matmul, "spinning": section_spinning}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    ap.add_argument("--preset", default="coca_ViT-B-32")
    ap.add_argument("--bundle", help="bundle directory for 'spinning': reused if it exists (it must come from the same "
                         "--preset and --seed), else exported there")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/decode_levers.json")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")

    import torch

    torch.set_num_threads(args.threads)
    # Sections not run this time keep their earlier results; each section records its date.
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(preset=args.preset, threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            results[name] = {**SECTIONS[name](args, Path(tmp)), "measured": time.strftime("%Y-%m-%d")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
