"""Training and distillation: CoCa training / fine-tuning, teacher->student distillation with
affinity, feature and caption knowledge, hard-negative captions, a memory-mapped
teacher-output cache, DDP under torchrun, atomic checkpoints with exact resume. See
docs/training.md."""
from .cache import CacheError, TeacherCache, build_cache, open_cache
from .checkpoint import CheckpointCorruptError, CheckpointSaveError
from .config import (KD_TERMS, LOSS_TERMS, DataConfig, EvalConfig, LossConfig, OptimConfig, TeacherConfig,
                     TrainConfig, TrainConfigError, load_config)
from .losses import (FeatureProjector, VocabSubset, affinity_loss, caption_kd_loss, caption_loss, contrastive_loss,
                     decoder_feature_loss, feature_loss, hard_negative_loss)
from ..data.metrics import bleu4, cider_d
from .trainer import TrainResult, distill, train

__all__ = [
    "CacheError", "CheckpointCorruptError", "CheckpointSaveError", "DataConfig", "EvalConfig", "FeatureProjector",
    "KD_TERMS", "LOSS_TERMS", "LossConfig", "OptimConfig", "TeacherCache", "TeacherConfig", "TrainConfig",
    "TrainConfigError", "TrainResult", "VocabSubset", "affinity_loss", "bleu4", "build_cache", "caption_kd_loss",
    "caption_loss", "cider_d", "contrastive_loss", "decoder_feature_loss", "distill", "feature_loss",
    "hard_negative_loss", "load_config", "open_cache", "train",
]
