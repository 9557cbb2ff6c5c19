"""Torch-free runtime: bundle loading, ONNX Runtime sessions, generation.

A device needs onnxruntime (or onnxruntime-gpu), numpy, pillow and the tokenizer's ftfy /
regex; nothing here imports torch.
"""
from .bundle import Bundle, BundleError
from .edge import Classification, EdgeCoCa, InputError
from .generation import DecoderLayout, GenerationConfig, GenerationOutput, generate
from .runners import MEMORY_PRESETS, MemoryConfig, OrtRunner, Runner, default_providers

__all__ = [
    "Bundle",
    "BundleError",
    "Classification",
    "DecoderLayout",
    "EdgeCoCa",
    "GenerationConfig",
    "GenerationOutput",
    "InputError",
    "MEMORY_PRESETS",
    "MemoryConfig",
    "OrtRunner",
    "Runner",
    "default_providers",
    "generate",
]
