"""CoCa models: configuration presets, the PyTorch module and open_clip interop."""
from .coca import PRUNED_LOGIT, CoCa, ContextLengthError, DecodeCache
from .inherit import InheritError, inherit_weights, prune_vocabulary
from .config import (
    CoCaConfig,
    ConfigError,
    DecoderConfig,
    TextConfig,
    VisionConfig,
    get_preset,
    list_presets,
)

__all__ = [
    "CoCa",
    "CoCaConfig",
    "PRUNED_LOGIT",
    "ConfigError",
    "ContextLengthError",
    "DecodeCache",
    "DecoderConfig",
    "TextConfig",
    "VisionConfig",
    "InheritError",
    "get_preset",
    "inherit_weights",
    "list_presets",
    "prune_vocabulary",
]
