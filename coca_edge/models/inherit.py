"""Weight inheritance: initialise a smaller CoCa from a larger one (TinyCLIP-style).

Layers are picked evenly through each tower (first and last kept). Widths are sliced by
importance, measured as weight magnitude: residual channels by the norm of every weight
that reads or writes them, attention heads and their dimensions by the norms of their
query/key and value/output slices, MLP units by ``|fc1 row| * |fc2 column|``. Kept indices
stay in the teacher's order, so a student with the teacher's exact shape is the teacher.

Consistency across towers: the text tower, the decoder and the attentional pooler's output
share one residual space (``embed_dim`` = text width = decoder width) and are sliced with
one channel set; the pooler keeps query 0 (the contrastive latent) and evenly spaced
others; the token id space, patch size and image size must match.

Vocabulary pruning (``CoCaConfig.vocab_subset``): a student keeps the teacher's embedding
rows and head columns of its subset, which must lie inside the teacher's own. A student
with the teacher's shape and a subset is the teacher, pruned: for kept tokens it computes
what the teacher does (``prune_vocabulary``).
"""
from __future__ import annotations

import torch

from .coca import CoCa
from .config import CoCaConfig

__all__ = ["InheritError", "inherit_weights", "prune_vocabulary"]


class InheritError(ValueError):
    """The student cannot inherit from this teacher (it is larger somewhere, or incompatible)."""


def _even(n_teacher: int, n_student: int) -> list[int]:
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    # Stable ties (e.g. freshly initialised weights) keep the lowest indices.
    order = torch.sort(-scores, stable=True).indices[:k]
    return torch.sort(order).values


def _check(teacher: CoCaConfig, student: CoCaConfig) -> None:
    problems = []

    def le(what: str, s: float, t: float) -> None:
        if s > t:
            problems.append(f"{what}: student {s} > teacher {t}")

    def eq(what: str, s: object, t: object) -> None:
        if s != t:
            problems.append(f"{what}: student {s} != teacher {t}")

    tv, sv = teacher.vision, student.vision
    eq("vision.patch_size", sv.patch_size, tv.patch_size)
    eq("vision.image_size", sv.image_size, tv.image_size)
    if tv.conv_stem and sv.conv_stem:
        eq("vision.conv_stem", sv.conv_stem, tv.conv_stem)
    le("vision.width", sv.width, tv.width)
    le("vision.layers", sv.layers, tv.layers)
    le("vision.heads", sv.heads, tv.heads)
    le("vision.head_width", sv.head_width, tv.head_width)
    le("vision.mlp", int(sv.width * sv.mlp_ratio), int(tv.width * tv.mlp_ratio))
    le("vision.attn_pooler_queries", sv.attn_pooler_queries, tv.attn_pooler_queries)
    le("vision.attn_pooler_heads", sv.attn_pooler_heads, tv.attn_pooler_heads)
    le("pooler head dim", student.embed_dim // sv.attn_pooler_heads, teacher.embed_dim // tv.attn_pooler_heads)
    for tower in ("text", "decoder"):
        t, s = getattr(teacher, tower), getattr(student, tower)
        le(f"{tower}.width", s.width, t.width)
        le(f"{tower}.layers", s.layers, t.layers)
        le(f"{tower}.heads", s.heads, t.heads)
        le(f"{tower}.head_dim", s.head_dim, t.head_dim)
        le(f"{tower}.mlp", int(s.width * s.mlp_ratio), int(t.width * t.mlp_ratio))
    eq("text.vocab_size", student.text.vocab_size, teacher.text.vocab_size)
    if teacher.vocab_subset:
        if not student.vocab_subset:
            problems.append(f"the teacher's vocabulary is pruned to {len(teacher.vocab_subset)} tokens: "
                            "the student needs a vocab_subset inside it")
        else:
            extra = sorted(set(student.vocab_subset) - set(teacher.vocab_subset))
            if extra:
                problems.append(f"vocab_subset: {len(extra)} token id(s) the pruned teacher does not have "
                                f"(first: {extra[:5]})")
    le("text.context_length", student.text.context_length, teacher.text.context_length)
    eq("quick_gelu", student.quick_gelu, teacher.quick_gelu)
    if problems:
        raise InheritError("cannot inherit weights: " + "; ".join(problems))


def _vocab_rows(teacher: CoCaConfig, student: CoCaConfig) -> torch.Tensor | None:
    """The teacher's embedding rows (= head columns) the student keeps; None: all of them."""
    if not student.vocab_subset:
        return None
    if not teacher.vocab_subset:
        return torch.tensor(student.vocab_subset)
    row = {token: i for i, token in enumerate(teacher.vocab_subset)}
    return torch.tensor([row[token] for token in student.vocab_subset])


class _Plan:
    def __init__(self, state: dict[str, torch.Tensor], teacher: CoCaConfig, student: CoCaConfig):
        self.t = state
        self.tc, self.sc = teacher, student
        self.vocab = _vocab_rows(teacher, student)
        self.layers = {
            "visual.blocks": _even(teacher.vision.layers, student.vision.layers),
            "text.blocks": _even(teacher.text.layers, student.text.layers),
            "decoder.blocks": _even(teacher.decoder.layers, student.decoder.layers),
            "decoder.cross": _even(teacher.decoder.layers, student.decoder.layers),
        }
        self.rv = _top(self._residual_scores("visual"), student.vision.width)
        self.re = _top(self._residual_scores("embed"), student.embed_dim)
        self.queries = torch.tensor([0] + [1 + i for i in _even(teacher.vision.attn_pooler_queries - 1,
                                                                   student.vision.attn_pooler_queries - 1)])
        self._attn_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- importance -----------------------------------------------------------------------
    def _blocks(self, prefix: str) -> list[str]:
        return [f"{prefix}.{i}" for i in self.layers[prefix]]

    def _residual_scores(self, space: str) -> torch.Tensor:
        t = self.t
        col = lambda w: w.float().pow(2).sum(dim=0)  # noqa: E731  (weights that read a channel)
        row = lambda w: w.float().pow(2).sum(dim=1)  # noqa: E731  (weights that write a channel)
        if space == "visual":
            score = row(t["visual.patch_embed.weight"].flatten(1)) + col(t["visual.pos_embed"])
            for b in self._blocks("visual.blocks"):
                score += col(t[f"{b}.attn.qkv.weight"]) + row(t[f"{b}.attn.out.weight"])
                score += col(t[f"{b}.mlp.fc1.weight"]) + row(t[f"{b}.mlp.fc2.weight"])
            score += col(t["visual.pool.k.weight"]) + col(t["visual.pool.v.weight"])
            return score
        emb, head = t["text.token_embedding.weight"], t["decoder.head"]
        if self.vocab is not None:  # only the tokens the student keeps
            emb, head = emb.index_select(0, self.vocab), head.index_select(1, self.vocab)
        score = col(emb) + row(head) + row(t["text.proj"])
        for b in self._blocks("text.blocks") + self._blocks("decoder.blocks"):
            score += col(t[f"{b}.attn.qkv.weight"]) + row(t[f"{b}.attn.out.weight"])
            score += col(t[f"{b}.mlp.fc1.weight"]) + row(t[f"{b}.mlp.fc2.weight"])
        for b in self._blocks("decoder.cross"):
            score += col(t[f"{b}.q.weight"]) + col(t[f"{b}.kv.weight"]) + row(t[f"{b}.out.weight"])
            score += col(t[f"{b}.mlp.fc1.weight"]) + row(t[f"{b}.mlp.fc2.weight"])
        score += row(t["visual.pool.out.weight"]) + col(t["visual.pool.q.weight"])
        return score

    def _attention(self, key: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   heads_t: int, heads_s: int, dim_s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the teacher's ``[heads * head_dim]`` space kept for q/k and for v/out."""
        if key not in self._attn_cache:
            dim_t = q.shape[0] // heads_t
            qk = (q.float().pow(2).sum(1) * k.float().pow(2).sum(1)).view(heads_t, dim_t)
            vo = (v.float().pow(2).sum(1) * out.float().pow(2).sum(0)).view(heads_t, dim_t)
            heads = _top(qk.sum(1).sqrt() + vo.sum(1).sqrt(), heads_s)
            qk_idx = torch.cat([h * dim_t + _top(qk[h], dim_s) for h in heads.tolist()])
            vo_idx = torch.cat([h * dim_t + _top(vo[h], dim_s) for h in heads.tolist()])
            self._attn_cache[key] = (qk_idx, vo_idx)
        return self._attn_cache[key]

    def _self_attn(self, block: str, width_t: int, heads_t: int, heads_s: int, dim_s: int):
        w = self.t[f"{block}.attn.qkv.weight"]
        return self._attention(block, w[:width_t], w[width_t:2 * width_t], w[2 * width_t:],
                               self.t[f"{block}.attn.out.weight"], heads_t, heads_s, dim_s)

    def _cross_attn(self, block: str, width_t: int, heads_t: int, heads_s: int, dim_s: int):
        kv = self.t[f"{block}.kv.weight"]
        return self._attention(block, self.t[f"{block}.q.weight"], kv[:width_t], kv[width_t:],
                               self.t[f"{block}.out.weight"], heads_t, heads_s, dim_s)

    def _mlp(self, block: str, hidden_s: int) -> torch.Tensor:
        fc1, fc2 = self.t[f"{block}.mlp.fc1.weight"], self.t[f"{block}.mlp.fc2.weight"]
        return _top(fc1.float().pow(2).sum(1).sqrt() * fc2.float().pow(2).sum(0).sqrt(), hidden_s)

    # -- per parameter --------------------------------------------------------------------
    def take(self, name: str) -> torch.Tensor:
        tensor_name, index = self._index(name)
        x = self.t[tensor_name]
        for axis, idx in enumerate(index):
            if idx is not None:
                x = x.index_select(axis, idx)
        return x.clone()

    def _index(self, name: str) -> tuple[str, list[torch.Tensor | None]]:
        rv, re = self.rv, self.re
        tc, sc = self.tc, self.sc
        fixed = {
            "visual.patch_embed.weight": [rv],
            "visual.stem.conv1.weight": [], "visual.stem.conv1.bias": [],
            "visual.stem.conv2.weight": [], "visual.stem.conv2.bias": [], "visual.stem.out.weight": [rv], "visual.cls_token": [rv], "visual.pos_embed": [None, rv],
            "visual.ln_pre.weight": [rv], "visual.ln_pre.bias": [rv],
            "visual.pool.query": [self.queries, re],
            "visual.pool.ln_q.weight": [re], "visual.pool.ln_q.bias": [re],
            "visual.pool.ln_k.weight": [rv], "visual.pool.ln_k.bias": [rv],
            "visual.ln_post.weight": [re], "visual.ln_post.bias": [re], "visual.proj": [re, re],
            "text.token_embedding.weight": [self.vocab, re], "text.cls_emb": [re],
            "text.pos_embed": [torch.arange(sc.text.context_length + 1), re],
            "text.ln_final.weight": [re], "text.ln_final.bias": [re], "text.proj": [re, re],
            "decoder.ln_final.weight": [re], "decoder.ln_final.bias": [re], "decoder.head": [re, self.vocab],
            "logit_scale": [],
        }
        if name in fixed:
            return name, fixed[name]
        if name.startswith("visual.pool."):
            qk, vo = self._attention("visual.pool", self.t["visual.pool.q.weight"], self.t["visual.pool.k.weight"],
                                     self.t["visual.pool.v.weight"], self.t["visual.pool.out.weight"],
                                     tc.vision.attn_pooler_heads, sc.vision.attn_pooler_heads,
                                     sc.embed_dim // sc.vision.attn_pooler_heads)
            part = name[len("visual.pool."):]
            table = {"q.weight": [qk, re], "q.bias": [qk], "k.weight": [qk, rv], "k.bias": [qk],
                     "v.weight": [vo, rv], "v.bias": [vo], "out.weight": [re, vo], "out.bias": [re]}
            return name, table[part]
        prefix, layer, part = self._split(name)
        block = f"{prefix}.{self.layers[prefix][layer]}"
        if prefix == "visual.blocks":
            r, width_t, heads_t, heads_s, dim_s = rv, tc.vision.width, tc.vision.heads, sc.vision.heads, sc.vision.head_width
            hidden_s = int(sc.vision.width * sc.vision.mlp_ratio)
        else:
            tower_t, tower_s = (tc.text, sc.text) if prefix == "text.blocks" else (tc.decoder, sc.decoder)
            r, width_t, heads_t, heads_s, dim_s = re, tower_t.width, tower_t.heads, tower_s.heads, tower_s.head_dim
            hidden_s = int(tower_s.width * tower_s.mlp_ratio)
        if part.startswith("mlp."):
            m = self._mlp(block, hidden_s)
            table = {"mlp.fc1.weight": [m, r], "mlp.fc1.bias": [m], "mlp.fc2.weight": [r, m], "mlp.fc2.bias": [r]}
            return f"{block}.{part}", table[part]
        if part.split(".")[0] in ("ln_1", "ln_1_kv", "ln_2"):
            return f"{block}.{part}", [r]
        if prefix == "decoder.cross":
            qk, vo = self._cross_attn(block, width_t, heads_t, heads_s, dim_s)
            kv = torch.cat([qk, width_t + vo])
            table = {"q.weight": [qk, r], "q.bias": [qk], "kv.weight": [kv, r], "kv.bias": [kv],
                     "out.weight": [r, vo], "out.bias": [r]}
            return f"{block}.{part}", table[part]
        qk, vo = self._self_attn(block, width_t, heads_t, heads_s, dim_s)
        qkv = torch.cat([qk, width_t + qk, 2 * width_t + vo])
        table = {"attn.qkv.weight": [qkv, r], "attn.qkv.bias": [qkv], "attn.out.weight": [r, vo], "attn.out.bias": [r]}
        return f"{block}.{part}", table[part]

    @staticmethod
    def _split(name: str) -> tuple[str, int, str]:
        parts = name.split(".")
        return f"{parts[0]}.{parts[1]}", int(parts[2]), ".".join(parts[3:])


@torch.no_grad()
def inherit_weights(teacher: CoCa, student_config: CoCaConfig) -> CoCa:
    """A new :class:`CoCa` with ``student_config``'s architecture and weights sliced from ``teacher``.

    Raises :class:`InheritError` when the student is larger than the teacher anywhere or
    the vocabulary / patch size / image size differ.
    """
    _check(teacher.config, student_config)
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    plan = _Plan(state, teacher.config, student_config)
    student = CoCa(student_config)
    new_state = {}
    for name, param in student.state_dict().items():
        if name.startswith("visual.stem.") and name not in state:
            # A convolutional stem the teacher lacks keeps its fresh initialisation, whose zero
            # output convolution leaves the inherited patch embedding's function unchanged.
            new_state[name] = param
            continue
        value = plan.take(name)
        if value.shape != param.shape:
            raise InheritError(f"internal: {name} sliced to {tuple(value.shape)}, expected {tuple(param.shape)}")
        new_state[name] = value.to(param.dtype)
    student.load_state_dict(new_state, strict=True)
    return student


def prune_vocabulary(model: CoCa, token_ids) -> CoCa:
    """``model`` keeping only ``token_ids`` (plus its start, end and pad tokens): exact for
    text made of kept tokens, and it never predicts another token. A model trained with
    ``caption_vocab: data`` on the same captions has zero head columns outside them, so
    pruning to that vocabulary only removes tokens whose logit was a constant 0."""
    return inherit_weights(model, model.config.with_vocabulary(token_ids))
