"""Compare candidates with a reference at the tensor and the task level.

``Validator`` runs the reference once (embeddings, greedy captions, per-graph outputs on a
few samples) and caches it; ``evaluate(candidate)`` runs a candidate on the same inputs and
returns a ``CandidateResult`` (numbers, never prints). ``validate`` is the stage's verb: it
evaluates every candidate, applies gates, localises drift and writes the reports.

Per-graph tensor checks feed each graph the reference's own inputs (pixels, token ids, the
reference's image tokens and cross K/V), so a drifting graph shows up under its own name
instead of in everything downstream of it. The decoder runs step by step under teacher
forcing on the reference's greedy captions, each model with its own KV cache.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..runtime.generation import GenerationConfig, decoder_feed, generate
from .data import EvalData, load_eval_data
from .gates import Gates, GateResult, load_gates
from .localize import NodeDrift, localize as localize_graph
from .metrics import TensorStats, caption_agreement, per_sample_cosine, topk_accuracy
from .models import ModelUnderTest, check_compatible, describe_device, open_model, same_architecture

__all__ = ["Validator", "CandidateResult", "ValidationReport", "validate", "score_tasks", "ModelOutputs"]

_LATENCY_RUNS = {1: 5, 8: 3}  # medians of this many timed runs after one warm-up
_DECODER_BATCH = 8  # teacher-forced tensor comparison (16 samples by default)
_LOCALIZE_FEEDS = 3


@dataclass
class ModelOutputs:
    """What one model produced on the evaluation data."""

    image_embed: np.ndarray
    text_embed: np.ndarray
    sequences: list[list[int]]
    captions: list[str]


@dataclass
class CandidateResult:
    """One model's numbers: ``metrics`` (flat, the names gates use), ``tensor`` (graph -> output ->
    statistics), ``tasks`` (per-task scores), ``captions`` (per captioned sample)."""

    spec: str
    info: dict[str, Any]
    metrics: dict[str, float]
    tensor: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    captions: list[dict[str, Any]] = field(default_factory=list)
    cosines: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample embedding cosines vs reference
    notes: list[str] = field(default_factory=list)
    gate_results: list[GateResult] = field(default_factory=list)
    localization: list[NodeDrift] = field(default_factory=list)
    label: str = ""  # the name reports show; defaults to the spec

    @property
    def name(self) -> str:
        return self.label or self.spec

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gate_results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec, "label": self.name, "info": self.info, "metrics": self.metrics, "tensor": self.tensor,
            "tasks": self.tasks, "captions": self.captions, "notes": self.notes,
            "cosines": {k: {"min": float(v.min()), "mean": float(v.mean()), "n": int(v.size)}
                        for k, v in self.cosines.items() if v.size},
            "gates": [g.to_dict() for g in self.gate_results], "passed": self.passed,
            "localization": [d.to_dict() for d in self.localization],
        }


@dataclass
class ValidationReport:
    reference: CandidateResult
    results: list[CandidateResult]
    gates: Gates | None
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # the validator that produced it: report.html draws its sample images from the evaluation data
    validator: Any = field(default=None, repr=False, compare=False)

    @property
    def gate_results(self) -> dict[str, list[GateResult]]:
        return {r.spec: r.gate_results for r in self.results}

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "seconds": self.seconds, "data": self.data, "notes": self.notes,
            "gates": None if self.gates is None else {"source": self.gates.source, "description": self.gates.description,
                                                      "gates": [str(g) for g in self.gates.gates],
                                                      "confidence": self.gates.confidence},
            "reference": self.reference.to_dict(),
            "candidates": [r.to_dict() for r in self.results],
        }


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Validator:
    """Runs the reference once on ``data`` and compares candidates with it."""

    def __init__(self, reference: str | os.PathLike | ModelUnderTest, data: str | EvalData = "synthetic-scenes:val",
                 samples: int = 500, batch_size: int = 32, max_new_tokens: int = 20, tensor_samples: int = 16,
                 progress: bool = True, providers: Sequence[str] | None = None, threads: int | None = None,
                 seed: int = 0, different_architecture: bool = False, corpus_metrics: bool = True,
                 device: str = "cpu"):
        if batch_size < 1 or max_new_tokens < 1 or tensor_samples < 1:
            raise ValueError(f"batch_size, max_new_tokens and tensor_samples must be >= 1, got {batch_size}, "
                             f"{max_new_tokens}, {tensor_samples}")
        # Checkpoints run on the torch ``device``; bundles on ONNX Runtime ``providers``.
        self.providers, self.threads, self.device = providers, threads, device
        # A student against its teacher: the same tasks and captions compared, no tensors
        # (different widths, and embedding spaces that need not be aligned).
        self.different_architecture = different_architecture
        self.reference = open_model(reference, providers=providers, threads=threads, device=device)
        self.data = data if isinstance(data, EvalData) else load_eval_data(
            str(data), samples, self.reference.edge.preprocess_config, seed)
        self.batch_size, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress
        # BLEU-4 / CIDEr-D against the data's captions; a fallback search whose gates do not
        # use them skips them (~0.5 s per evaluation of 1000 demo scenes).
        self.corpus_metrics = corpus_metrics
        self.generation = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens)
        self.layout = self.reference.edge.layout
        self.texts = self.data.texts
        self.text_ids = (self.reference.tokenizer(self.texts, context_length=self.layout.context_length)
                         if self.texts else np.zeros((0, self.layout.context_length), np.int64))
        cap = self.data.captioning
        self.caption_rows = cap.rows if cap is not None else np.zeros(0, np.int64)
        self.tensor_rows = (self.caption_rows if len(self.caption_rows) else np.arange(len(self.data.pixels)))[
            :tensor_samples]
        self._ref = self._run(self.reference)
        self._ref_scores = score_tasks(self.data, self.texts, self._ref, self.corpus_metrics)
        self._ref_tensor = self._reference_tensors()

    # -- running a model -----------------------------------------------------------------
    def _bar(self, iterable: Iterable, desc: str, total: int | None = None):
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False)

    def _run(self, model: ModelUnderTest) -> ModelOutputs:
        px, bs, name = self.data.pixels, self.batch_size, os.path.basename(model.spec.rstrip("/"))
        enc = model.runners["image_encoder"]
        image_embed = [enc.run({"pixel_values": px[i:i + bs]})["image_embed"]
                       for i in self._bar(range(0, len(px), bs), f"{name}: images", math.ceil(len(px) / bs))]
        text = model.runners["text_encoder"]
        text_embed = [text.run({"input_ids": self.text_ids[i:i + 64]})["text_embed"]
                      for i in self._bar(range(0, len(self.text_ids), 64), f"{name}: texts",
                                         math.ceil(len(self.text_ids) / 64))]
        sequences: list[list[int]] = []
        rows = self.caption_rows
        # Captions in batches of batch_size too: batch 8 took twice the wall time of 32 on the
        # demo (dynamic INT8 scales activations per batch, so its captions depend on it a little).
        for i in self._bar(range(0, len(rows), bs), f"{name}: captions", math.ceil(len(rows) / bs)):
            cross = model.edge.cross_kv(px[rows[i:i + bs]])
            sequences += generate(model.runners["decoder"], cross, model.edge.layout, self.generation).sequences
        embed_dim = int(model.model_config["embed_dim"])
        return ModelOutputs(np.concatenate(image_embed) if image_embed else np.zeros((0, embed_dim), np.float32),
                            np.concatenate(text_embed) if text_embed else np.zeros((0, embed_dim), np.float32),
                            sequences, [model.tokenizer.decode(s) for s in sequences])

    def _latency(self, model: ModelUnderTest) -> dict[str, float]:
        rows = self.caption_rows if len(self.caption_rows) else np.arange(len(self.data.pixels))
        out = {}
        for batch, runs in _LATENCY_RUNS.items():
            px = self.data.pixels[rows[:batch]]
            if len(px) < batch:
                continue  # too few images for this batch size: no number rather than a wrong one
            times = []
            for k in range(runs + 1):
                start = time.perf_counter()
                model.edge.caption_ids(px, batch_size=batch, strategy="greedy", max_new_tokens=self.max_new_tokens)
                if k:  # the first run warms up allocators and caches
                    times.append((time.perf_counter() - start) * 1000)
            out[f"latency_b{batch}_ms"] = statistics.median(times)
        return out

    # -- tensor level --------------------------------------------------------------------
    def _graph_inputs(self) -> dict[str, list[dict[str, np.ndarray]]]:
        """The reference's own inputs for each graph, in batches."""
        px = self.data.pixels[self.tensor_rows]
        bs = self.batch_size
        feeds: dict[str, list[dict[str, np.ndarray]]] = {
            "image_encoder": [{"pixel_values": px[i:i + bs]} for i in range(0, len(px), bs)],
            "text_encoder": [{"input_ids": self.text_ids[:len(self.tensor_rows)]}] if len(self.text_ids) else [],
        }
        return feeds

    def _reference_tensors(self) -> dict[str, Any]:
        ref = self.reference
        cache: dict[str, Any] = {}
        for graph, feeds in self._graph_inputs().items():
            cache[graph] = [(feed, ref.runners[graph].run(feed)) for feed in feeds]
        tokens = [out["image_tokens"] for _, out in cache["image_encoder"]]
        if "cross_kv" in ref.runners:
            cache["cross_kv"] = [({"image_tokens": t}, ref.runners["cross_kv"].run({"image_tokens": t}))
                                 for t in tokens]
            cross = np.concatenate([out["cross_kv"] for _, out in cache["cross_kv"]], axis=2)
        else:
            cross = np.concatenate([out["cross_kv"] for _, out in cache["image_encoder"]], axis=2)
        seqs = self._ref.sequences[:len(self.tensor_rows)]
        cache["decoder"] = []
        self._decoder_feeds: list[dict[str, np.ndarray]] = []
        for i in range(0, len(seqs), _DECODER_BATCH):
            batch_cross = np.ascontiguousarray(cross[:, :, i:i + _DECODER_BATCH])
            batch_seqs = seqs[i:i + _DECODER_BATCH]
            steps = list(self._teacher_forced(ref.runners["decoder"], batch_cross, batch_seqs, record=not i))
            cache["decoder"].append((batch_cross, batch_seqs, steps))
        return cache

    def _teacher_forced(self, runner: Any, cross: np.ndarray, seqs: Sequence[Sequence[int]], record: bool = False):
        """Yield ``(valid_rows, logits, present or None)`` per step, feeding the reference's tokens."""
        lay = self.layout.for_inputs(runner.input_names)
        steps = max(len(s) for s in seqs)
        ids = np.full((len(seqs), steps), lay.pad_token_id, dtype=np.int64)
        for b, s in enumerate(seqs):
            prefix = [lay.sot_token_id, *s][:len(s)]
            ids[b, :len(prefix)] = prefix
        past = lay.empty_past(len(seqs))
        for t in range(steps):
            feed = decoder_feed(ids[:, t:t + 1], past, cross)
            if record and t in (0, 1, 3) and len(self._decoder_feeds) < _LOCALIZE_FEEDS:
                self._decoder_feeds.append({k: np.ascontiguousarray(v) for k, v in feed.items()})
            out = runner.run(feed)
            valid = np.asarray([t < len(s) for s in seqs])
            past = lay.next_past(out)
            yield valid, out["logits"][valid, -1], lay.stack_past(past) if t == steps - 1 else None

    def _tensor_level(self, model: ModelUnderTest) -> tuple[dict, dict[str, float], list[str]]:
        notes: list[str] = []
        stats: dict[str, dict[str, TensorStats]] = {}

        def add(graph: str, name: str, ref: np.ndarray, cand: np.ndarray, axis: int = 0) -> None:
            stats.setdefault(graph, {}).setdefault(name, TensorStats()).update(ref, cand, axis)

        for graph in ("image_encoder", "text_encoder", "cross_kv"):
            if graph not in self._ref_tensor:
                continue
            if graph not in model.runners:
                notes.append(f"{graph}: the candidate has no such graph (fused), not compared on its own")
                continue
            for feed, ref_out in self._ref_tensor[graph]:
                out = model.runners[graph].run(feed)
                for name in ref_out.keys() & out.keys():
                    add(graph, name, ref_out[name], out[name], 2 if name == "cross_kv" else 0)
        agree, total = 0, 0
        # A vocabulary-pruned model has logits only for its kept tokens (a constant elsewhere):
        # the logits are compared on the tokens both models keep.
        subsets = [set(c["vocab_subset"]) for c in (self.reference.model_config, model.model_config)
                   if c.get("vocab_subset")]
        cols = np.array(sorted(set.intersection(*subsets))) if subsets else None
        if cols is not None:
            notes.append(f"decoder logits compared on the {len(cols)} tokens both models keep (vocabulary pruning)")
        for cross, seqs, ref_steps in self._ref_tensor["decoder"]:
            for (_, ref_logits, ref_present), (_, logits, present) in zip(
                    ref_steps, self._teacher_forced(model.runners["decoder"], cross, seqs)):
                if cols is not None:
                    ref_logits, logits = ref_logits[:, cols], logits[:, cols]
                add("decoder", "logits", ref_logits, logits)
                agree += int((ref_logits.argmax(-1) == logits.argmax(-1)).sum())
                total += len(logits)
                if ref_present is not None:
                    add("decoder", "present_text", ref_present[0], present[0], 2)
                    add("decoder", "present_decoder", ref_present[1], present[1], 2)
        tensor = {g: {o: s.result() for o, s in outs.items()} for g, outs in stats.items()}
        flat = {f"{g}.{o}.{k}": v for g, outs in tensor.items() for o, vals in outs.items() for k, v in vals.items()}
        flat["decoder.logits.top1_agreement"] = agree / total if total else math.nan
        # Positions of one caption are not independent, so this standard error is a lower bound.
        flat["decoder.logits.top1_agreement_se"] = _proportion_se(agree / total, total) if total else math.nan
        return tensor, flat, notes

    # -- task level ----------------------------------------------------------------------
    def _caption_rows(self, out: ModelOutputs, agreement: dict) -> list[dict[str, Any]]:
        from ..data.tasks import score_caption

        task = self.data.captioning.task if self.data.captioning is not None else None
        scenes = task.scenes if task is not None else None
        rows = []
        for k, (ref, cand) in enumerate(zip(self._ref.captions, out.captions)):
            row = {"row": int(self.caption_rows[k]), "reference": ref, "candidate": cand,
                   "differs": agreement["differs"][k], "first_divergence": agreement["first_divergence"][k]}
            if scenes is not None:
                row["hallucinated_reference"] = score_caption(ref, scenes[k])["hallucinated"]
                row["hallucinated_candidate"] = score_caption(cand, scenes[k])["hallucinated"]
            rows.append(row)
        return rows

    # -- public --------------------------------------------------------------------------
    def reference_result(self, latency: bool = False) -> CandidateResult:
        """The reference's own (absolute) metrics, as a row for reports."""
        metrics = dict(self._ref_scores["metrics"])
        if latency:
            metrics.update(self._latency(self.reference))
        metrics["bytes"] = self.reference.bytes
        if self.reference.params is not None:
            metrics["params"] = self.reference.params
        return CandidateResult(self.reference.spec, self.reference.info(),
                               {k: v for k, v in metrics.items() if v is not None},
                               tasks=self._ref_scores["tasks"], notes=list(self.data.notes))

    def evaluate(self, candidate: str | os.PathLike | ModelUnderTest, latency: bool = True) -> CandidateResult:
        model = open_model(candidate, providers=self.providers, threads=self.threads, device=self.device)
        check_compatible(self.reference, model, self.different_architecture)
        comparable = same_architecture(self.reference, model)
        out = self._run(model)
        scores = score_tasks(self.data, self.texts, out, self.corpus_metrics)
        metrics = dict(scores["metrics"])
        ref_metrics = self._ref_scores["metrics"]
        for name, drop in (("zero_shot_top1", "zero_shot_top1_drop"), ("retrieval_R@1", "retrieval_R@1_drop")):
            if name in metrics and name in ref_metrics:
                metrics[drop] = (ref_metrics[name] - metrics[name]) * 100
        metrics.update(_drop_standard_errors(self._ref_scores["hits"], scores["hits"]))
        if "hallucination_rate" in metrics and "hallucination_rate" in ref_metrics:
            metrics["hallucination_rate_increase"] = (metrics["hallucination_rate"]
                                                      - ref_metrics["hallucination_rate"]) * 100
            metrics["hallucination_rate_increase_se"] = _ratio_increase_se(
                self._ref_scores["hits"], scores["hits"], "hallucinated", "mentions")
        ref_preds, preds = self._ref_scores["preds"], scores["preds"]
        if preds:
            same = np.concatenate([ref_preds[k] == preds[k] for k in preds])
            metrics["zero_shot_top1_agreement"] = float(same.mean()) if same.size else math.nan
        cosines = {}
        if comparable and len(out.image_embed):
            cosines["image_embed"] = per_sample_cosine(self._ref.image_embed, out.image_embed)
        if comparable and len(out.text_embed):
            cosines["text_embed"] = per_sample_cosine(self._ref.text_embed, out.text_embed)
        if cosines:
            metrics["embed_cosine_min"] = float(min(c.min() for c in cosines.values()))
        captions: list[dict[str, Any]] = []
        if out.sequences:
            agreement = caption_agreement(self._ref.sequences, out.sequences)
            metrics["caption_exact_match"] = agreement["exact_match"]
            metrics["caption_exact_match_se"] = _proportion_se(agreement["exact_match"], len(out.sequences))
            metrics["caption_token_agreement"] = agreement["token_agreement"]
            metrics["first_divergence_mean"] = float(np.mean(agreement["first_divergence"]))
            captions = self._caption_rows(out, agreement)
        if comparable:
            tensor, flat, notes = self._tensor_level(model)
            metrics.update(flat)
        else:
            tensor, notes = {}, [f"{model.spec}: architecture differs from the reference: compared on tasks and "
                                 "captions only (no embedding cosines, no per-graph tensors)"]
        if latency:
            metrics.update(self._latency(model))
        metrics["bytes"] = model.bytes
        if model.params is not None:
            metrics["params"] = model.params
        metrics = {k: (float(v) if not isinstance(v, int) else v) for k, v in metrics.items() if v is not None}
        return CandidateResult(model.spec, model.info(), metrics, tensor, scores["tasks"], captions, cosines,
                               notes)

    def localize(self, candidate: str | os.PathLike | ModelUnderTest, top_k: int = 10) -> tuple[list[NodeDrift], list[str]]:
        """The ``top_k`` FP32 nodes adding the most error across the candidate's ONNX graphs.

        Needs the FP32 ONNX graphs: the reference bundle's, or the bundle named by the
        candidate manifest's ``source_bundle``.
        """
        model = open_model(candidate, providers=self.providers, threads=self.threads, device=self.device)
        if model.kind != "onnx":
            return [], [f"{model.spec}: localisation needs an ONNX candidate"]
        ref_files = dict(self.reference.graph_files)
        source = model.manifest.get("source_bundle")
        if not ref_files and source:
            source_model = open_model(source)
            ref_files = dict(source_model.graph_files)
        if not ref_files:
            return [], [f"{model.spec}: no FP32 ONNX graphs to localise against (the reference is a checkpoint and "
                        "the candidate's manifest names no source_bundle)"]
        drifts: list[NodeDrift] = []
        notes: list[str] = []
        for graph, path in model.graph_files.items():
            if graph not in ref_files or (graph != "decoder" and graph not in self._ref_tensor):
                continue
            ref_sha = _sha(ref_files[graph])
            if ref_sha == _sha(path):
                continue  # the same file: nothing to localise
            try:
                drifts += localize_graph(ref_files[graph], path, self.feeds(graph), top_k=top_k, graph=graph)
            except ValueError as err:
                notes.append(f"{graph}: {err}")
        drifts.sort(key=lambda d: (-d.added_error_db, d.sqnr_db))
        return drifts[:top_k], notes

    def feeds(self, graph: str, limit: int = _LOCALIZE_FEEDS) -> list[dict[str, np.ndarray]]:
        """Up to ``limit`` input feeds of ``graph`` recorded from the reference run (for ``localize``):
        pixel batches, token ids, the reference's image tokens, and decoder steps with the reference's
        own KV cache under teacher forcing."""
        if graph == "decoder":
            return list(self._decoder_feeds[:limit])
        if graph not in self._ref_tensor:
            raise ValueError(f"no recorded feeds for graph {graph!r}; graphs: {sorted(self._ref_tensor)}")
        return [feed for feed, _ in self._ref_tensor[graph][:limit]]


def score_tasks(data: EvalData, texts: Sequence[str], out: ModelOutputs, corpus_metrics: bool = True) -> dict[str, Any]:
    """Absolute task metrics of one model's outputs: ``{"metrics", "tasks", "preds", "hits"}``
    (``preds``: per zero-shot task the predicted class per image, for agreement with the
    reference; ``hits``: per-sample outcomes (``zs_<task>``, ``i2t_R@1``, ``t2i_R@1``, and per
    caption ``hallucinated`` / ``mentions``) that give the drops' standard errors). Without
    ``corpus_metrics`` BLEU-4 and CIDEr-D are skipped."""
    from ..data import score_captions
    from ..data.metrics import bleu4, cider_d
    from ..data.tasks import score_caption

    metrics, tasks, preds, hits = {}, {}, {}, {}
    text_row = {t: i for i, t in enumerate(texts)}

    def texts_embed(chosen: list[str]) -> np.ndarray:
        return out.text_embed[[text_row[t] for t in chosen]]

    top1, top5 = [], []
    for name, bound in data.zero_shot.items():
        images = out.image_embed[bound.rows]
        classes = bound.task.class_embeddings(texts_embed)
        scored = bound.task.score(images, classes)
        logits = _unit(images) @ _unit(classes).T
        scored["top5"] = topk_accuracy(logits, bound.task.labels, 5)
        preds[name] = logits.argmax(axis=1)
        hits[f"zs_{name}"] = preds[name] == np.asarray(bound.task.labels)
        tasks[name] = scored
        metrics[f"zs_{name}"] = scored["accuracy"]
        top1.append(scored["accuracy"])
        top5.append(scored["top5"])
    if top1:
        metrics["zero_shot_top1"] = float(np.mean(top1))
        metrics["zero_shot_top5"] = float(np.mean(top5))
    for name, bound in data.choice.items():
        scored = bound.task.score(out.image_embed[bound.rows], bound.task.candidate_embeddings(texts_embed))
        tasks[name] = scored
        metrics[name] = scored["accuracy"]
    if data.retrieval is not None:
        bound = data.retrieval
        i2t_hits, t2i_hits = bound.task.ranked_hits(out.image_embed[bound.rows], texts_embed(list(bound.task.texts)))
        scored = bound.task.score_ranked(i2t_hits, t2i_hits, ks=(1, 5, 10))
        tasks["retrieval"] = scored
        metrics.update({k: scored[k] for k in scored if "R@" in k})
        metrics["retrieval_R@1"] = (scored["i2t_R@1"] + scored["t2i_R@1"]) / 2
        hits["i2t_R@1"], hits["t2i_R@1"] = i2t_hits[:, 0].copy(), t2i_hits[:, 0].copy()
    if data.captioning is not None and out.captions:
        task = data.captioning.task
        refs = [list(r) for r in task.references]
        caps: dict[str, Any] = {"n": len(out.captions)}
        if corpus_metrics and all(refs):
            caps["bleu4"] = metrics["bleu4"] = bleu4(out.captions, refs)
            caps["cider"] = metrics["cider"] = cider_d(out.captions, refs)
        if task.scenes is not None:
            counts = [score_caption(c, scene) for c, scene in zip(out.captions, task.scenes)]
            caps.update(score_captions(out.captions, list(task.scenes), refs, counts=counts))
            metrics["hallucination_rate"] = caps["hallucination_rate"]
            hits["hallucinated"] = np.array([c["hallucinated"] for c in counts], dtype=np.float64)
            hits["mentions"] = np.array([c["mentions"] for c in counts], dtype=np.float64)
        tasks["captioning"] = caps
    return {"metrics": metrics, "tasks": tasks, "preds": preds, "hits": hits}


def _paired_drop_se(ref: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> float:
    """Standard error, in points, of ``mean over parts of (ref accuracy - cand accuracy)``
    from per-sample outcomes paired on the same samples: each part's paired differences give
    its variance, and the parts are independent samples."""
    var = 0.0
    for r, c in zip(ref, cand):
        d = r.astype(np.float64) - c.astype(np.float64)
        if len(d) < 2:
            return math.nan
        var += d.var(ddof=1) / len(d)
    return 100.0 * math.sqrt(var) / len(ref)


def _drop_standard_errors(ref_hits: Mapping[str, np.ndarray], hits: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``zero_shot_top1_drop_se`` and ``retrieval_R@1_drop_se``: how much the drops move from
    sample noise alone (two models that differ by near-ties flip a few outcomes both ways)."""
    out = {}
    for drop, keys in (("zero_shot_top1_drop", sorted(k for k in hits if k.startswith("zs_"))),
                       ("retrieval_R@1_drop", [k for k in ("i2t_R@1", "t2i_R@1") if k in hits])):
        keys = [k for k in keys if k in ref_hits and len(ref_hits[k]) == len(hits[k])]
        if keys:
            out[f"{drop}_se"] = _paired_drop_se([ref_hits[k] for k in keys], [hits[k] for k in keys])
    return out


def _ratio_increase_se(ref_hits: Mapping[str, np.ndarray], hits: Mapping[str, np.ndarray],
                       num: str, den: str) -> float:
    """Standard error, in points, of ``sum(num) / sum(den)`` (candidate) minus the same ratio
    for the reference, paired on the same samples (both captioned the same images): each
    ratio linearised around its value (delta method), ``z_i = (num_i - R den_i) / mean(den)``,
    and the paired differences of ``z`` give the variance. NaN when the samples differ or
    either side mentions nothing."""
    if any(k not in ref_hits or k not in hits for k in (num, den)) or len(ref_hits[num]) != len(hits[num]):
        return math.nan
    n = len(hits[num])
    if n < 2:
        return math.nan
    z = []
    for side in (hits, ref_hits):
        a, b = side[num].astype(np.float64), side[den].astype(np.float64)
        if b.sum() <= 0:
            return math.nan
        z.append((a - a.sum() / b.sum() * b) / b.mean())
    d = z[0] - z[1]
    return 100.0 * float(d.std(ddof=1)) / math.sqrt(n)


def _proportion_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else math.nan


def _sha(path: os.PathLike) -> str:
    from ..runtime.bundle import graph_sha256

    return graph_sha256(path)


def validate(reference: str | os.PathLike | ModelUnderTest, candidates: Sequence[str | os.PathLike | ModelUnderTest],
             data: str = "synthetic-scenes:val", samples: int = 500, gates: Gates | str | os.PathLike | None = None,
             localize: int = 0, out: str | os.PathLike | None = None, latency: bool = True,
             batch_size: int = 32, max_new_tokens: int = 20, tensor_samples: int = 16, progress: bool = True,
             providers: Sequence[str] | None = None, threads: int | None = None,
             labels: Sequence[str] | None = None, different_architecture: bool = False,
             device: str = "cpu") -> ValidationReport:
    """Validate candidates against a reference; with ``out``, write report.json/md/html there.

    Checkpoints (and their ``@fp16`` / ``@bf16`` variants) run on the torch ``device`` (``cuda``
    measures a GPU's own FP16 / BF16 arithmetic); bundles run on ONNX Runtime ``providers``.

    ``labels`` names the candidates in reports (default: their specs). ``different_architecture``
    allows candidates of another architecture (a student against its teacher): they are compared
    on tasks and captions only, and gates on tensor metrics fail as not evaluated."""
    start = time.perf_counter()
    if not candidates:
        raise ValueError("no candidates to validate")
    if labels is not None and len(labels) != len(candidates):
        raise ValueError(f"{len(labels)} labels for {len(candidates)} candidates")
    if gates is not None and not isinstance(gates, Gates):
        gates = load_gates(gates)
    if out is not None:
        import matplotlib  # noqa: F401  (report.html's plots; fail now, not after the whole run)
    ref = open_model(reference, providers=providers, threads=threads, device=device)
    models = [open_model(c, providers=providers, threads=threads, device=device) for c in candidates]
    for m in models:  # fail on incompatible inputs before any long run
        check_compatible(ref, m, different_architecture)
    validator = Validator(ref, data, samples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          tensor_samples=tensor_samples, progress=progress, providers=providers, threads=threads,
                          different_architecture=different_architecture, device=device)
    ref_row = validator.reference_result(latency=latency)
    results = []
    for i, m in enumerate(models):
        result = validator.evaluate(m, latency=latency)
        result.label = labels[i] if labels is not None else ""
        if gates is not None:
            result.gate_results = gates.evaluate(result.metrics)
        if localize > 0:
            result.localization, loc_notes = validator.localize(m, top_k=localize)
            result.notes += loc_notes
        results.append(result)
    info = {"source": validator.data.source, "samples_per_task": samples, "images": int(len(validator.data.pixels)),
            "texts": len(validator.texts), "captioned": int(len(validator.caption_rows)),
            "tensor_samples": int(len(validator.tensor_rows)), "max_new_tokens": max_new_tokens}
    notes = list(validator.data.notes)
    if device != "cpu":
        if any(m.kind == "torch" for m in (ref, *models)):
            info["device"] = device
            notes.append(f"checkpoints ran on {describe_device(device)}; bundles on ONNX Runtime")
        else:
            notes.append(f"device {device} unused: every model is a bundle and runs on ONNX Runtime (its "
                         "providers: --providers)")
    report = ValidationReport(ref_row, results, gates, info, notes, time.perf_counter() - start, validator)
    if out is not None:
        from .report import write_reports

        write_reports(report, out)
    return report
