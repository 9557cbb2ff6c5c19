"""Exporters: declarative graph specs, ONNX export with built-in validation, TensorRT engines.

The spec names are loaded on first use (PEP 562), so ``coca_edge.exporters.tensorrt`` and
``coca-edge build-engine`` import on a device without torch (engines are built there).
"""
from __future__ import annotations

from typing import Any

__all__ = ["GRAPH_NAMES", "GraphSpec", "TensorSpec", "get_spec", "graph_specs"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import specs

        return getattr(specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
