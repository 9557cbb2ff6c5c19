"""Training / distillation configuration: frozen dataclasses, validated, YAML round-trip.

One :class:`TrainConfig` drives both ``coca-edge train`` (ground-truth losses only) and
``coca-edge distill`` (a ``teacher`` plus any of the knowledge-distillation terms). Unknown
keys are errors at every level; ``a.b=v`` overrides are applied before validation.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "TrainConfigError",
    "DataConfig",
    "OptimConfig",
    "LossConfig",
    "TeacherConfig",
    "EvalConfig",
    "TrainConfig",
    "LOSS_TERMS",
    "KD_TERMS",
    "load_config",
    "apply_overrides",
]

CONFIG_VERSION = 1
# Names used in configs, logs and metrics; ground truth first, then the three kinds of knowledge.
LOSS_TERMS = ("contrastive", "caption", "hard_negative", "affinity", "feature", "decoder_feature", "caption_kd",
              "caption_seq_kd")
KD_TERMS = ("affinity", "feature", "decoder_feature", "caption_kd", "caption_seq_kd")


class TrainConfigError(ValueError):
    """A training configuration is invalid."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TrainConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from. ``dataset`` is ``synthetic-scenes`` (embedded, random access)
    or a path to an open_clip-style CSV/TSV (``filepath``/``title`` columns)."""

    dataset: str = "synthetic-scenes"
    train_size: int = 100_000
    seed: int = 0
    # Longer tokenised captions are cut (the end token is kept); bounds the decoder length.
    max_text_len: int = 32
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    # Rendered synthetic scenes and tokenised captions are kept in memory up to this many MiB
    # (20k demo scenes at 64 px: ~250 MiB), so later epochs neither render nor tokenise; 0: never.
    memory_cache_mb: int = 2048

    def __post_init__(self) -> None:
        _check(self.train_size > 0, f"data.train_size must be > 0, got {self.train_size}")
        _check(self.memory_cache_mb >= 0, f"data.memory_cache_mb must be >= 0, got {self.memory_cache_mb}")
        _check(2 <= self.max_text_len <= 77, f"data.max_text_len must be in [2, 77], got {self.max_text_len}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay (the seed's fine-tuning defaults)."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas must be two values in [0, 1), got {self.betas}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.schedule in ("cosine", "constant"), f"optim.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "optim.clip_grad_norm must be > 0 or null")


@dataclass(frozen=True)
class LossConfig:
    """Weights of every term (0 switches a term off) and their knobs.

    ``caption_vocab='data'`` holds the decoder-head columns of tokens that never occur in the
    training captions at zero and computes their share of the softmax in closed form: the
    same full-vocabulary model, ~20x cheaper steps on a small-vocabulary dataset.
    """

    contrastive: float = 1.0
    caption: float = 2.0
    # NegCLIP: image->text InfoNCE whose candidates are the batch's captions plus one
    # hard-negative caption per sample (an attribute swapped or changed, see faithful.py).
    hard_negative: float = 0.0
    affinity: float = 0.0
    feature: float = 0.0
    # 1 - cos between the student's and the teacher's final decoder states (before the
    # vocabulary head) along the ground-truth captions, through a learned projection when
    # the widths differ.
    decoder_feature: float = 0.0
    caption_kd: float = 0.0
    # Sequence-level KD: the caption_kd KL along captions the teacher generates (greedy,
    # once, cached with the other teacher outputs) instead of the ground-truth captions.
    caption_seq_kd: float = 0.0
    label_smoothing: float = 0.0
    feature_metric: str = "cosine"
    affinity_temperature: float = 1.0
    kd_temperature: float = 2.0
    caption_vocab: str = "full"

    def __post_init__(self) -> None:
        for name in LOSS_TERMS:
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        _check(any(getattr(self, n) > 0 for n in LOSS_TERMS), "at least one loss weight must be > 0")
        _check(0 <= self.label_smoothing < 1, "loss.label_smoothing must be in [0, 1)")
        _check(self.feature_metric in ("cosine", "l2"), f"loss.feature_metric must be 'cosine' or 'l2', got {self.feature_metric!r}")
        _check(self.affinity_temperature > 0 and self.kd_temperature > 0, "loss temperatures must be > 0")
        _check(self.caption_vocab in ("full", "data"), f"loss.caption_vocab must be 'full' or 'data', got {self.caption_vocab!r}")

    @property
    def uses_teacher(self) -> bool:
        return any(getattr(self, n) > 0 for n in KD_TERMS)


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher and its output cache. ``path`` is any checkpoint ``load_checkpoint`` reads."""

    path: str | None = None
    preset: str | None = None
    use_cache: bool = True
    cache_dir: str | None = None
    topk: int = 8
    # Sequence-level KD skips images whose teacher caption names an object or attribute the
    # scene does not have (synthetic-scenes only: the scene must be known).
    filter_hallucinated: bool = False

    def __post_init__(self) -> None:
        _check(self.topk >= 1, f"teacher.topk must be >= 1, got {self.topk}")
        _check(isinstance(self.filter_hallucinated, bool),
               f"teacher.filter_hallucinated must be true or false, got {self.filter_hallucinated!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation on the validation split (synthetic-scenes tasks)."""

    every: int = 0
    split: str = "val"
    n: int = 300
    captions: int = 100
    at_end: bool = True

    def __post_init__(self) -> None:
        _check(self.every >= 0 and self.n > 0 and self.captions >= 0, "eval.every/n/captions must be >= 0 (n > 0)")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs. ``init`` is ``scratch``, ``inherit`` (from the teacher) or
    a checkpoint path to fine-tune. ``vocab``: ``full`` keeps the tokenizer's whole vocabulary
    in the model; ``data`` prunes it to the tokens of the training captions (a
    ``vocab_subset`` model: far fewer parameters, same tokenizer, see docs/training.md)."""

    model: str = "test-tiny"
    init: str = "scratch"
    vocab: str = "full"
    output_dir: str = "runs/train"
    seed: int = 0
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    precision: str = "fp32"
    freeze_visual_epochs: float = 0.0
    time_budget_s: float | None = None
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    threads: int | None = None
    export_dtype: str = "float32"
    # Also write the metrics as TensorBoard scalars under <output_dir>/tensorboard
    # (needs the tensorboard package: pip install "coca-edge[tensorboard]").
    tensorboard: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _check(self.batch_size > 0 and self.grad_accum > 0, "batch_size and grad_accum must be > 0")
        _check(self.batch_size % self.grad_accum == 0,
               f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        _check(self.vocab in ("full", "data"), f"vocab must be 'full' or 'data', got {self.vocab!r}")
        _check(self.precision in ("fp32", "bf16"), f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        _check(self.freeze_visual_epochs >= 0, "freeze_visual_epochs must be >= 0")
        _check(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s must be > 0 or null")
        _check(self.log_every > 0 and self.save_every > 0 and self.keep_last > 0, "log_every, save_every, keep_last must be > 0")
        _check(self.export_dtype in ("float32", "float16", "bfloat16"), f"export_dtype must be float32/float16/bfloat16, got {self.export_dtype!r}")
        _check(self.version == CONFIG_VERSION, f"unsupported train config version {self.version}")
        if self.init == "inherit" or self.loss.uses_teacher:
            reasons = (["init: inherit"] if self.init == "inherit" else []) + [
                f"loss.{n} > 0" for n in KD_TERMS if getattr(self.loss, n) > 0]
            _check(self.teacher.path is not None,
                   f"a teacher is needed ({', '.join(reasons)}): set teacher.path / --teacher")
        _check(not self.teacher.filter_hallucinated or self.data.dataset == "synthetic-scenes",
               "teacher.filter_hallucinated needs data.dataset: synthetic-scenes (only there is the scene of each "
               f"image known to judge a teacher caption), got {self.data.dataset!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        return _build(cls, data, source)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "loss": LossConfig, "teacher": TeacherConfig, "eval": EvalConfig}


def _build(cls: type, data: Any, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = dict(data)
    for f in dataclasses.fields(cls):
        # YAML 1.1 reads "1e-4" as a string; numbers in float fields are coerced.
        if "float" in str(f.type) and isinstance(kwargs.get(f.name), str):
            try:
                kwargs[f.name] = float(kwargs[f.name])
            except ValueError:
                raise TrainConfigError(f"{source}.{f.name}: expected a number, got {kwargs[f.name]!r}") from None
    if cls is TrainConfig:
        for key, section in _SECTIONS.items():
            if key in kwargs:
                kwargs[key] = _build(section, kwargs[key] or {}, f"{source}.{key}")
    try:
        return cls(**kwargs)
    except TrainConfigError as err:
        raise TrainConfigError(f"{source}: {err}") from None
    except TypeError as err:
        raise TrainConfigError(f"{source}: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, in place."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (or start from defaults) and apply overrides."""
    import yaml

    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise TrainConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(data, overrides)
    return TrainConfig.from_dict(data, source)
