"""Quantization of bundles: FP16, INT8 (dynamic, static QDQ), weight-only INT4/INT8, accuracy-aware fallback.

``quantize(bundle_dir, config, out_dir, calib)`` is the one verb; the config's type selects
the method (``methods.py`` registers one function per config class) and a preset maps each
graph to its own config (``presets.py``).
"""
from .api import quantize, resolve_plan
from .config import (
    AutoFallbackConfig,
    Fp16Config,
    Fp32Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    QuantizeError,
    WeightOnlyConfig,
    config_from_dict,
)
from .presets import PRESETS, preset_plan

__all__ = ["quantize", "resolve_plan", "preset_plan", "PRESETS", "QuantizeError", "AutoFallbackConfig", "Fp16Config",
           "Fp32Config", "Int8DynamicConfig", "Int8StaticConfig", "WeightOnlyConfig", "config_from_dict"]
