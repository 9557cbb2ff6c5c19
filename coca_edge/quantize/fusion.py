"""Attention fusion for ONNX Runtime: the exported decoder's attention blocks as one contrib op each.

The exporter writes attention in standard ONNX (what TensorRT and every runtime read): per
self-attention block a Reshape / Transpose / Gather split of the packed QKV projection, a
Concat per cache tensor, ``K @ qᵀ``, a scale, the causal mask (``Where``), Softmax, ``pᵀ @ V``,
Transpose and Reshape back (about fifteen nodes); per cross-attention block seven. ORT's
``com.microsoft.MultiHeadAttention`` does the same in one kernel, appending the new K / V to
the past inside it. On the coca_ViT-B-32 INT8 decoder that takes the decode step from
8.95-9.22 to 8.27-8.42 ms at batch 1 and 23.6-24.6 to 21.0-21.5 ms at batch 8 (two runs,
docs/quantization.md).

Only ORT runs the result (measured on its CPU provider; its CUDA provider has the kernel, but no
CUDA onnxruntime was available to run it here), so it is a quantizer option
(``fuse_attention``) that the ``cpu`` preset sets on the decoder, not an export default.
The rewrite is all or nothing: every Softmax of the graph must sit in one of the two
patterns below, or it raises and the graph is left as it was written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import QuantizeError

__all__ = ["fuse_attention"]


class _NoMatch(Exception):
    pass


def _one(nodes: list[Any], op: str, what: str) -> Any:
    if len(nodes) != 1 or nodes[0].op_type != op:
        raise _NoMatch(f"{what}: expected one {op}, found {[n.op_type for n in nodes]}")
    return nodes[0]


def _scalar(graph: Any, name: str) -> float:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            if value.size == 1:
                return float(value.reshape(()))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1:
                return float(value.reshape(()))
    raise _NoMatch(f"{name} is not a constant scalar")


def _heads(graph: Any, producer: dict[str, Any], reshape: Any) -> tuple[int, int]:
    """(heads, head_dim) from the Reshape splitting the projection: shape ``[B, S, (3,) H, D]``."""
    from onnx import numpy_helper

    shape = producer.get(reshape.input[1])
    if shape is None or shape.op_type != "Concat":
        raise _NoMatch("the head split's shape is not a Concat")
    inits = {i.name: i for i in graph.initializer}
    dims = []
    for name in shape.input[-2:]:
        if name not in inits:
            raise _NoMatch("the head split's H and D are not constants")
        dims.append(int(numpy_helper.to_array(inits[name]).reshape(-1)[0]))
    return dims[0], dims[1]


def fuse_attention(path: str | Path) -> dict[str, int]:
    """Rewrite the graph at ``path`` in place; returns ``{"self": n, "cross": m}`` blocks fused.

    Self-attention (the text tower's and the decoder's, causal, with a cache)::

        qkv -> Reshape[B,S,3,H,D] -> Transpose -> Gather q / k / v
        present_k = Concat(past_k, k), present_v = Concat(past_v, v)
        Softmax(Where(mask, -inf, (present_k @ qᵀ) * scale), axis=-2) -> ᵀ @ present_v -> Transpose -> Reshape

    becomes ``Split(qkv) -> MultiHeadAttention(q, k, v, past_k, past_v, unidirectional=1)``
    with outputs (attention, present_k, present_v) under the old names. Cross-attention::

        q -> Reshape[B,S,H,D] -> Transpose -> cross_k @ . -> * scale -> Softmax -> ᵀ @ cross_v -> Transpose -> Reshape

    becomes ``MultiHeadAttention(q, cross_k, cross_v)`` (K / V given as ``[B, H, N, D]``).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        raise QuantizeError(f"{path.name}: fuse_attention found no attention (no Softmax) to fuse")
    replace: dict[int, list[Any]] = {}  # id(node) -> nodes written in its place
    drop: set[int] = set()
    new_inits = []
    counts = {"self": 0, "cross": 0}
    try:
        for k, softmax in enumerate(softmaxes):
            where = f"{path.name}: Softmax {softmax.name!r}"
            if [a.i for a in softmax.attribute if a.name == "axis"] != [-2]:
                raise _NoMatch(f"{where}: expected scores laid out [.., keys, queries] (axis -2)")
            pre = producer.get(softmax.input[0])
            causal = pre is not None and pre.op_type == "Where"
            mul = producer.get(pre.input[2]) if causal else pre
            if mul is None or mul.op_type != "Mul":
                raise _NoMatch(f"{where}: no scale before it")
            scale = _scalar(graph, mul.input[1])
            scores = producer.get(mul.input[0])
            if scores is None or scores.op_type != "MatMul":
                raise _NoMatch(f"{where}: the scores are not a MatMul")
            probs_t = _one(consumers.get(softmax.output[0], []), "Transpose", where)
            mixed = _one(consumers.get(probs_t.output[0], []), "MatMul", where)
            back = _one(consumers.get(mixed.output[0], []), "Transpose", where)
            merged = _one(consumers.get(back.output[0], []), "Reshape", where)
            keys, values = scores.input[0], mixed.input[1]
            q_t = producer.get(scores.input[1])
            if q_t is None or q_t.op_type != "Transpose":
                raise _NoMatch(f"{where}: the query is not transposed into the scores")
            tag = f"fused_attention_{k}"
            if causal:
                cat_k, cat_v = producer.get(keys), producer.get(values)
                if not (cat_k is not None and cat_v is not None and cat_k.op_type == cat_v.op_type == "Concat"
                        and len(cat_k.input) == len(cat_v.input) == 2):
                    raise _NoMatch(f"{where}: the keys / values are not a cache Concat")
                pick = producer.get(q_t.input[0])
                split = producer.get(pick.input[0]) if pick is not None and pick.op_type == "Gather" else None
                if split is None or split.op_type != "Transpose":
                    raise _NoMatch(f"{where}: the query is not picked from the packed projection")
                view = producer.get(split.input[0])
                if view is None or view.op_type != "Reshape":
                    raise _NoMatch(f"{where}: the packed projection is not split into heads")
                picked = [producer.get(c.input[1]) for c in (cat_k, cat_v)]
                if not all(p is not None and p.op_type == "Gather" and p.input[0] == pick.input[0] for p in picked):
                    raise _NoMatch(f"{where}: the new keys / values are not picked from the same projection")
                heads, dim = _heads(graph, producer, view)
                sizes = numpy_helper.from_array(np.array([heads * dim] * 3, np.int64), f"{tag}_sizes")
                new_inits.append(sizes)
                qkv = [f"{tag}_{x}" for x in "qkv"]
                nodes = [helper.make_node("Split", [view.input[0], sizes.name], qkv, axis=-1, name=f"{tag}_split"),
                         helper.make_node("MultiHeadAttention",
                                          [*qkv, "", "", "", cat_k.input[0], cat_v.input[0]],
                                          [merged.output[0], cat_k.output[0], cat_v.output[0]],
                                          domain="com.microsoft", num_heads=heads, scale=scale, unidirectional=1,
                                          name=tag)]
                drop |= {id(cat_k), id(cat_v)}
                counts["self"] += 1
            else:
                view = producer.get(q_t.input[0])
                if view is None or view.op_type != "Reshape":
                    raise _NoMatch(f"{where}: the query is not split into heads")
                heads, _ = _heads(graph, producer, view)
                nodes = [helper.make_node("MultiHeadAttention", [view.input[0], keys, values], [merged.output[0]],
                                          domain="com.microsoft", num_heads=heads, scale=scale, name=tag)]
                counts["cross"] += 1
            replace[id(merged)] = nodes
    except _NoMatch as err:
        raise QuantizeError(f"fuse_attention: {err}; the graph is left unfused (the option is for the "
                            "decoder coca-edge export writes)") from None
    written = []
    for n in graph.node:
        if id(n) in replace:
            written.extend(replace[id(n)])
        elif id(n) not in drop:
            written.append(n)
    # drop what only the old attention nodes used (walk back from the graph outputs)
    needed = {o.name for o in graph.output}
    kept = []
    for n in reversed(written):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(x for x in n.input if x)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in (*graph.initializer, *new_inits) if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    return counts
