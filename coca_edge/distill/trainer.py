"""The training engine behind ``coca-edge train`` and ``coca-edge distill``.

One loop serves CoCa training, fine-tuning and distillation; it runs as one process or
under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). Exactness by construction:

- the batch of step ``s`` is a pure function of ``(seed, s)`` (``data.StepSampler``), so a
  resumed run needs only the step, and ``w`` ranks see the one-process batch split in ``w``;
- contrastive and affinity terms use features gathered (with gradient) from all ranks,
  token/sample averages are divided by the global count: the ``w``-process gradient equals
  the one-process gradient of the same global batch up to reduction order;
- nothing random happens after initialisation (no dropout, no augmentation).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models import CoCa, CoCaConfig, get_preset
from ..models.inherit import inherit_weights, prune_vocabulary
from ..models.openclip import CheckpointError, load_checkpoint
from ..tokenizer import Tokenizer
from . import checkpoint as ckpt
from .cache import TeacherCache, build_cache, cache_key, open_cache, teacher_fingerprint
from .config import LOSS_TERMS, TrainConfig, TrainConfigError
from .data import HardNegatives, StepSampler, TrainData, make_batch, open_train_data, tokenize
from .faithful import hallucinated
from .forward import StudentForward, TeacherOutputs, teacher_generated, teacher_outputs
from .losses import (FeatureProjector, VocabSubset, affinity_loss, caption_kd_loss, caption_loss,
                     contrastive_loss, decoder_feature_loss, feature_loss, hard_negative_loss, width_projection)

__all__ = ["train", "distill", "TrainResult", "resolve_model_config", "data_vocabulary"]


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    step: int
    params: int
    eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class _Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            self.owned = True
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)

    def gather_values(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated, without gradient (masks, ids)."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.detach().clone()
            dist.all_reduce(x)
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (wall-clock stops must not diverge)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()


def resolve_model_config(name: str) -> CoCaConfig:
    """A preset name or a path to a ``config.json``."""
    if name.endswith(".json") or os.path.sep in name:
        return CoCaConfig.from_json(name)
    return get_preset(name)


def data_vocabulary(data: TrainData, tokenizer: Tokenizer, config: CoCaConfig, max_text_len: int,
                    scan: int = 50_000) -> torch.Tensor:
    """Token ids of the first ``scan`` training captions, plus the end token."""
    seen: set[int] = {config.eot_token_id}
    n = min(scan, len(data))
    for lo in range(0, n, 2048):
        captions = data.captions(range(lo, min(n, lo + 2048)))
        ids = tokenize(tokenizer, captions, max_text_len, config.eot_token_id, config.pad_token_id)
        seen.update(int(i) for i in set(ids[:, 1:].ravel().tolist()))
    seen.discard(config.pad_token_id)
    return torch.tensor(sorted(seen))


def _lr(cfg: TrainConfig, step: int) -> float:
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _fused_adamw(device: torch.device) -> bool:
    # torch's fused AdamW runs on CPU and CUDA; elsewhere (MPS on old torch, XLA) the per-tensor loop
    return device.type in ("cpu", "cuda")


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's rule: no decay for gains, biases and the logit scale.
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        skip = p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _load_teacher(cfg: TrainConfig, device: torch.device) -> CoCa | None:
    if cfg.teacher.path is None:
        return None
    preset = resolve_model_config(cfg.teacher.preset) if cfg.teacher.preset else None
    teacher = load_checkpoint(cfg.teacher.path, preset=preset).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def check_teacher(teacher: CoCaConfig, student: CoCaConfig, cfg: TrainConfig) -> None:
    """Clear errors for teacher/student pairs the configured losses cannot bridge. Different
    embedding widths are fine (feature KD learns a projection; affinity compares in-batch
    similarities, which have no width)."""
    problems = []
    # every term that compares the two models token by token along one tokenised caption
    caption_kd = cfg.loss.caption_kd > 0 or cfg.loss.caption_seq_kd > 0 or cfg.loss.decoder_feature > 0
    if caption_kd or cfg.init == "inherit":
        if teacher.vocab_size != student.vocab_size:
            problems.append(f"vocabulary sizes differ (teacher {teacher.vocab_size}, student {student.vocab_size}): "
                            "caption_kd / caption_seq_kd / decoder_feature and weight inheritance need one tokenizer")
        for key in ("sot_token_id", "eot_token_id", "pad_token_id"):
            if getattr(teacher, key) != getattr(student, key):
                problems.append(f"{key} differs (teacher {getattr(teacher, key)}, student {getattr(student, key)})")
    if caption_kd and teacher.context_length < min(cfg.data.max_text_len + 1, student.context_length):
        problems.append(f"teacher context length {teacher.context_length} is shorter than the student's captions "
                        f"({cfg.data.max_text_len} tokens + 1): lower data.max_text_len")
    if problems:
        raise TrainConfigError("teacher and student are incompatible: " + "; ".join(problems))


def _init_student(cfg: TrainConfig, model_cfg: CoCaConfig, teacher: CoCa | None) -> CoCa:
    torch.manual_seed(cfg.seed)
    if cfg.init == "scratch":
        return CoCa(model_cfg)
    if cfg.init == "inherit":
        assert teacher is not None
        return inherit_weights(teacher.cpu(), model_cfg)
    try:
        return load_checkpoint(cfg.init)
    except CheckpointError as err:
        if "no architecture" not in str(err):
            raise
        return load_checkpoint(cfg.init, preset=model_cfg)


class _LiveTeacher:
    def __init__(self, teacher: CoCa, cfg: TrainConfig, data: TrainData, tokenizer: Tokenizer, student_cfg: CoCaConfig):
        self.teacher, self.cfg, self.data, self.tokenizer = teacher, cfg, data, tokenizer
        tc = teacher.config
        self.same_pixels = (tc.vision.image_size, tc.image_mean, tc.image_std) == (
            student_cfg.vision.image_size, student_cfg.image_mean, student_cfg.image_std)

    def __call__(self, batch, indices) -> TeacherOutputs:
        pixels = batch.pixels if self.same_pixels else make_batch(
            self.data, indices, self.tokenizer, self.teacher.config, self.cfg.data.max_text_len).pixels
        device = next(self.teacher.parameters()).device
        pixels = pixels.to(device)
        pad = self.teacher.config.pad_token_id
        with torch.no_grad():
            image = self.teacher.encode_image(pixels)  # once for both kinds of targets
        out = teacher_outputs(self.teacher, pixels, batch.text.to(device), self.cfg.teacher.topk,
                              self.cfg.loss.kd_temperature, pad, image,
                              with_decoder_hidden=self.cfg.loss.decoder_feature > 0)
        if self.cfg.loss.caption_seq_kd > 0:
            out = out.with_generated(*teacher_generated(self.teacher, pixels, _positions(self.teacher.config, self.cfg),
                                                        self.cfg.teacher.topk, self.cfg.loss.kd_temperature, image),
                                     pad)
        return out


class _CachedTeacher:
    def __init__(self, cache: TeacherCache, generated: TeacherCache | None, pad_id: int,
                 decoder: TeacherCache | None = None):
        self.cache, self.generated, self.pad_id, self.decoder = cache, generated, pad_id, decoder

    def __call__(self, batch, indices) -> TeacherOutputs:
        out = self.cache.lookup(batch.ids)
        if self.decoder is not None:
            out.decoder_hidden = self.decoder.rows(batch.ids)["decoder_hidden"]
        out = out.positions(batch.text.shape[1] - 1)
        if self.generated is not None:
            g = self.generated.rows(batch.ids)
            out = out.with_generated(g["gen_text"], g["gen_topk_ids"], g["gen_topk_log_probs"], self.pad_id)
        return out


def _positions(teacher: CoCaConfig, cfg: TrainConfig) -> int:
    """Caption positions the teacher's targets cover (the longest trimmed caption)."""
    return min(teacher.context_length, cfg.data.max_text_len + 1) - 1


def _teacher_source(cfg: TrainConfig, teacher: CoCa, data: TrainData, tokenizer: Tokenizer, student_cfg: CoCaConfig,
                    d: _Dist, progress: bool):
    if not cfg.teacher.use_cache:
        return _LiveTeacher(teacher, cfg, data, tokenizer, student_cfg)
    tc = teacher.config
    positions = _positions(tc, cfg)
    preprocess = {"image_size": tc.vision.image_size, "mean": list(tc.image_mean), "std": list(tc.image_std)}
    fingerprint = teacher_fingerprint(teacher)
    root = Path(cfg.teacher.cache_dir or Path(cfg.output_dir) / "teacher-cache")
    kinds = (["targets"] + (["generated"] if cfg.loss.caption_seq_kd > 0 else [])
             + (["decoder"] if cfg.loss.decoder_feature > 0 else []))
    caches = {}
    for kind in kinds:
        key, spec = cache_key(fingerprint, data.identity, preprocess, positions, cfg.teacher.topk,
                              cfg.loss.kd_temperature, kind)
        if d.main and open_cache(root, key) is None:
            build_cache(root, key, spec, teacher, data, tokenizer, cfg.data.max_text_len, progress=progress)
        d.barrier()
        cache = open_cache(root, key)
        if cache is None:
            raise RuntimeError(f"teacher cache {root / key} was not built")
        caches[kind] = cache
    return _CachedTeacher(caches["targets"], caches.get("generated"), tc.pad_token_id, caches.get("decoder"))


class _HallucinationFilter:
    """``teacher.filter_hallucinated``: marks the samples whose teacher caption the scene
    judges hallucinated, so sequence-level KD skips them."""

    def __init__(self, data: TrainData, tokenizer: Tokenizer):
        if not data.has_scenes:
            raise TrainConfigError(f"teacher.filter_hallucinated needs data.dataset: synthetic-scenes (the scene of "
                                   f"each image must be known), got {data.name!r}")
        self.data, self.tokenizer = data, tokenizer

    def __call__(self, t: TeacherOutputs, indices) -> TeacherOutputs:
        keep = ~hallucinated(t.gen_text, self.data.scenes(indices), self.tokenizer)
        return dataclasses.replace(t, gen_keep=keep.to(t.gen_text.device))


def _losses(out: dict[str, torch.Tensor], labels: torch.Tensor, t: TeacherOutputs | None, cfg: TrainConfig,
            vocab: VocabSubset, pad_id: int, d: _Dist,
            negatives: HardNegatives | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total (to backpropagate on this rank) and each term's global value.
    ``negatives``: the batch's hard negatives (``loss.hard_negative``)."""
    lc = cfg.loss
    total = torch.zeros((), device=labels.device)
    logs: dict[str, float] = {}

    def local_mean(name: str, s: torch.Tensor, n: torch.Tensor) -> None:
        nonlocal total
        n_global = d.sum(n.float()).clamp(min=1)
        total = total + getattr(lc, name) * d.world * s / n_global
        logs[name] = float(d.sum(s.detach()) / n_global)

    def whole(name: str, value: torch.Tensor) -> None:
        nonlocal total
        total = total + getattr(lc, name) * value
        logs[name] = float(value.detach())

    need_gather = lc.contrastive > 0 or lc.affinity > 0 or lc.hard_negative > 0
    image = d.gather(out["image"]) if need_gather else None
    text = d.gather(out["text"]) if need_gather else None
    if lc.contrastive > 0:
        whole("contrastive", contrastive_loss(image, text, out["logit_scale"], lc.label_smoothing))
    if lc.caption > 0:
        local_mean("caption", *caption_loss(out["log_probs"], labels, vocab, pad_id, lc.label_smoothing))
    if lc.hard_negative > 0:
        if negatives is None or "negative_text" not in out:
            raise ValueError("loss.hard_negative needs the batch's negatives (make_batch(..., negatives=True)) "
                             "and their embeddings (StudentForward(..., negatives=...))")
        valid = d.gather_values(negatives.valid.to(labels.device))
        if d.world > 1:  # make_batch checked this rank's positives; the candidates are every rank's
            keys = d.gather_values(negatives.keys.to(labels.device))
            valid = valid & ~torch.isin(keys, d.gather_values(negatives.positive_keys.to(labels.device)))
        whole("hard_negative", hard_negative_loss(image, text, d.gather(out["negative_text"]), valid,
                                                  out["logit_scale"]))
        logs["hard_negative_share"] = float(valid.float().mean())
    if lc.affinity > 0:
        whole("affinity", affinity_loss(image, text, out["logit_scale"], d.gather(t.image), d.gather(t.text),
                                        t.logit_scale, lc.affinity_temperature))
    if lc.feature > 0:
        si, ni = feature_loss(out["proj_image"], t.image, nn.Identity(), lc.feature_metric)
        st, nt = feature_loss(out["proj_text"], t.text, nn.Identity(), lc.feature_metric)
        local_mean("feature", (si + st) / 2, ni)
    if lc.decoder_feature > 0:
        local_mean("decoder_feature", *decoder_feature_loss(out["proj_decoder"], t.decoder_hidden.to(labels.device),
                                                            nn.Identity(), labels != pad_id))
    if lc.caption_kd > 0:
        mask = labels != pad_id
        local_mean("caption_kd", *caption_kd_loss(out["log_probs_kd"], vocab, t.topk_ids, t.topk_log_probs, mask,
                                                  lc.kd_temperature))
    if lc.caption_seq_kd > 0:
        gen_mask = t.gen_text[:, 1:] != pad_id
        if t.gen_keep is not None:
            keep = t.gen_keep.to(gen_mask.device)
            gen_mask = gen_mask & keep.unsqueeze(1)
            filtered = d.sum((~keep).sum().float()) / d.sum(torch.tensor(float(keep.numel()), device=keep.device))
            logs["seq_kd_filtered"] = float(filtered)
        local_mean("caption_seq_kd", *caption_kd_loss(out["log_probs_seq_kd"], vocab, t.gen_topk_ids,
                                                      t.gen_topk_log_probs, gen_mask, lc.kd_temperature))
    logs["loss"] = sum(getattr(lc, k) * v for k, v in logs.items() if k in LOSS_TERMS)
    return total, logs


def _visual_params(model: CoCa) -> list[nn.Parameter]:
    return list(model.visual.parameters())


def _export(model: CoCa, path: Path, dtype: str) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch_dtype = getattr(torch, dtype)
    save_file({k: v.detach().cpu().to(torch_dtype).contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(model.config.to_json())
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


class _MetricsLog:
    """Rank 0's metrics: JSONL always, TensorBoard scalars when ``tensorboard: true``."""

    def __init__(self, path: Path, start_step: int, tensorboard: bool):
        self.path = path
        _truncate_metrics(path, start_step)
        self.writer = None
        if tensorboard:  # presence checked at the start of ``train``
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after the checkpoint it resumes from
            self.writer = SummaryWriter(str(path.parent / "tensorboard"), purge_step=start_step or None)

    def write(self, row: dict[str, Any], prefix: str = "train") -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            values = row.get("eval", row)
            for key, value in values.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    """Train (or fine-tune, or distill into) ``cfg.model``; see ``TrainConfig``.

    ``resume``: ``'latest'`` continues from ``<output_dir>/checkpoints/latest`` if there is
    one, a directory continues from that checkpoint.
    """
    from tqdm import tqdm

    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainConfigError("tensorboard: true needs the tensorboard package (pip install \"coca-edge[tensorboard]\")")
    started = time.time()
    d = _Dist()
    metrics: _MetricsLog | None = None
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        out_dir = Path(cfg.output_dir)
        ckpt_root = out_dir / "checkpoints"
        if d.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "train_config.json").write_text(cfg.to_json())
        model_cfg = resolve_model_config(cfg.model)
        teacher = _load_teacher(cfg, d.device)
        if teacher is not None:
            check_teacher(teacher.config, model_cfg, cfg)
        global_batch = cfg.batch_size
        if global_batch % (cfg.grad_accum * d.world):
            raise TrainConfigError(f"batch_size {global_batch} must be divisible by grad_accum x world size "
                                   f"({cfg.grad_accum} x {d.world})")
        vocab_ids = data = None
        if cfg.vocab == "data" and cfg.init in ("scratch", "inherit"):
            # the kept tokens are part of the architecture: scan the captions before building it
            # (a student built from model_cfg has model_cfg's preprocessing, so the data is reused)
            data = open_train_data(cfg.data, model_cfg)
            vocab_ids = data_vocabulary(data, Tokenizer(context_length=model_cfg.context_length), model_cfg,
                                        cfg.data.max_text_len)
            model_cfg = model_cfg.with_vocabulary(vocab_ids.tolist())
        model = _init_student(cfg, model_cfg, teacher)
        model_cfg = model.config  # a checkpoint brings its own architecture (and preprocessing)
        tokenizer = Tokenizer(context_length=model_cfg.context_length)
        if data is None:
            data = open_train_data(cfg.data, model_cfg)
        if vocab_ids is None and (cfg.loss.caption_vocab == "data" or cfg.vocab == "data"):
            vocab_ids = data_vocabulary(data, tokenizer, model_cfg, cfg.data.max_text_len)
        if cfg.vocab == "data" and not model_cfg.vocab_subset:  # a full-vocabulary checkpoint to fine-tune
            model = prune_vocabulary(model, vocab_ids.tolist())
            model_cfg = model.config
        model.to(d.device)
        vocab = VocabSubset.for_model(model_cfg, vocab_ids)
        if not vocab.full:
            outside = torch.ones(model_cfg.vocab_size, dtype=torch.bool)
            outside[vocab.ids] = False
            with torch.no_grad():
                model.decoder.head[:, outside.to(d.device)] = 0
        projector = None
        if cfg.loss.feature > 0:
            torch.manual_seed(cfg.seed + 1)
            projector = FeatureProjector(model_cfg.embed_dim, teacher.config.embed_dim).to(d.device)
        decoder_projector = None
        if cfg.loss.decoder_feature > 0:
            torch.manual_seed(cfg.seed + 2)
            decoder_projector = width_projection(model_cfg.decoder.width, teacher.config.decoder.width).to(d.device)
        student = StudentForward(model, vocab, projector,
                                 cfg.loss.kd_temperature if cfg.loss.caption_kd > 0 else None,
                                 cfg.loss.kd_temperature if cfg.loss.caption_seq_kd > 0 else None,
                                 decoder_projector)
        seq_filter = None
        if cfg.teacher.filter_hallucinated and cfg.loss.caption_seq_kd > 0:
            seq_filter = _HallucinationFilter(data, tokenizer)
        # fused: one kernel over all parameters instead of ~10 small ops per tensor; the same
        # update (losses equal to 6 digits over 100 steps) at 1.24x the demo's samples/s on 2 CPU cores.
        optimizer = torch.optim.AdamW(_param_groups(student, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=cfg.optim.betas, eps=cfg.optim.eps, fused=_fused_adamw(d.device))
        start_step = 0
        if resume:
            path = ckpt.resolve_resume(ckpt_root, resume)
            if path is not None:
                loaded = ckpt.load_checkpoint_dir(path)
                saved_arch = loaded.meta.get("model_config")
                if saved_arch is not None and saved_arch != json.loads(model_cfg.to_json()):
                    raise TrainConfigError(f"checkpoint {path} holds a different architecture than {cfg.model}")
                model.load_state_dict(loaded.model, strict=True)
                for prefix, module in (("projector.", projector), ("decoder_projector.", decoder_projector)):
                    if module is not None:
                        module.load_state_dict({k[len(prefix):]: v for k, v in loaded.extra.items()
                                                if k.startswith(prefix)}, strict=True)
                optimizer.load_state_dict(loaded.state["optimizer"])
                torch.set_rng_state(loaded.state["torch_rng"])
                start_step = int(loaded.meta["step"])
        teacher_source = None
        if cfg.loss.uses_teacher:
            teacher_source = _teacher_source(cfg, teacher, data, tokenizer, model_cfg, d, progress)
        metrics = _MetricsLog(out_dir / "metrics.jsonl", start_step, cfg.tensorboard) if d.main else None
        sampler = StepSampler(len(data), global_batch, cfg.seed)
        freeze_steps = math.ceil(cfg.freeze_visual_epochs * len(data) / global_batch)
        evaluator = None
        params = sum(p.numel() for p in model.parameters())
        pad_id = model_cfg.pad_token_id
        frozen_state: bool | None = None
        wrapped: nn.Module = student
        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", disable=not (progress and d.main),
                   dynamic_ncols=True)
        window_samples, window_start = 0, time.time()
        last_eval: dict[str, Any] = {}
        step = start_step
        budget_start = time.time()

        def save(step_done: int) -> None:
            if not d.main:
                return
            extra = {f"{prefix}{k}": v for prefix, module in (("projector.", projector),
                                                              ("decoder_projector.", decoder_projector))
                     if module is not None for k, v in module.state_dict().items()}
            ckpt.save_checkpoint(
                ckpt_root, step_done, model.state_dict(), model_cfg.to_json(), extra,
                {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                {"samples_seen": step_done * global_batch, "epoch": sampler.epoch(step_done),
                 "world_size": d.world, "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict()},
                cfg.keep_last)

        def evaluate(step_done: int) -> dict[str, Any]:
            nonlocal evaluator
            if cfg.data.dataset != "synthetic-scenes":
                return {}
            if evaluator is None:
                from .evaluate import Evaluator

                evaluator = Evaluator(model_cfg.vision.image_size, cfg.eval.split, cfg.eval.n, cfg.eval.captions,
                                      seed=cfg.data.seed)
            result = evaluator(model)
            metrics.write({"step": step_done, "eval": result}, prefix="eval")
            return result

        while step < cfg.steps:
            frozen = step < freeze_steps
            if frozen != frozen_state:
                for p in _visual_params(model):
                    p.requires_grad_(not frozen)
                if d.world > 1:
                    wrapped = nn.parallel.DistributedDataParallel(
                        student, device_ids=[d.device] if d.device.type == "cuda" else None)
                frozen_state = frozen
            lr = _lr(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logs_acc: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                indices = sampler.indices(step, micro, cfg.grad_accum, d.rank, d.world)
                batch = make_batch(data, indices, tokenizer, model_cfg, cfg.data.max_text_len,
                                   negatives=cfg.loss.hard_negative > 0)
                t_out = teacher_source(batch, indices) if teacher_source is not None else None
                if t_out is not None:
                    if seq_filter is not None:
                        t_out = seq_filter(t_out, indices)
                    t_out = t_out.to(d.device)
                neg_text = batch.negatives.text.to(d.device) if batch.negatives is not None else None
                generated = t_out.gen_text if t_out is not None else None  # set only with caption_seq_kd
                last = micro == cfg.grad_accum - 1
                sync = wrapped.no_sync() if (d.world > 1 and not last) else _null()
                with sync:
                    with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                        out = wrapped(batch.pixels.to(d.device), batch.text.to(d.device), generated, neg_text)
                    labels = batch.text[:, 1:].to(d.device)
                    total, logs = _losses(out, labels, t_out, cfg, vocab, pad_id, d, batch.negatives)
                    (total / cfg.grad_accum).backward()
                for k, v in logs.items():
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / cfg.grad_accum
            if cfg.optim.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad],
                                               cfg.optim.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                # CLIP's clamp: the temperature may not drop below 0.01.
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            window_samples += global_batch
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                rate = window_samples / max(now - window_start, 1e-9)
                row = {"step": step, "epoch": round(sampler.epoch(step), 4), "lr": lr,
                       **{k: round(v, 6) for k, v in logs_acc.items()}, "samples_per_s": round(rate, 1),
                       "elapsed_s": round(now - started, 1), "frozen_visual": frozen}
                if d.main:
                    metrics.write(row)
                    bar.set_postfix(loss=f"{logs_acc['loss']:.4f}", samples_s=f"{rate:.0f}", refresh=False)
                window_samples, window_start = 0, now
            bar.update(1)
            out_of_time = cfg.time_budget_s is not None and time.time() - budget_start >= cfg.time_budget_s
            out_of_time = d.agree(out_of_time)
            if step % cfg.save_every == 0 or step == cfg.steps or out_of_time:
                save(step)
            if d.main and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.steps and not out_of_time:
                last_eval = evaluate(step)
            d.barrier()
            if out_of_time:
                break
        bar.close()
        final_dir = None
        if d.main:
            if cfg.eval.at_end:
                last_eval = evaluate(step)
            final_dir = _export(model, out_dir / "final", cfg.export_dtype)
            summary = {"step": step, "params": params, "seconds": round(time.time() - started, 1),
                       "world_size": d.world, "eval": last_eval}
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        d.barrier()
        return TrainResult(out_dir, final_dir, step, params, last_eval, time.time() - started)
    finally:
        if metrics is not None:
            metrics.close()
        d.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def distill(cfg: TrainConfig, resume: str | None = None, progress: bool = True) -> TrainResult:
    """``train`` with a teacher: raises unless a teacher is configured."""
    if cfg.teacher.path is None:
        raise TrainConfigError("distill needs a teacher: set teacher.path or pass --teacher")
    return train(cfg, resume=resume, progress=progress)
