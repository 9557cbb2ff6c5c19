"""Exporters: declarative graph specs, ONNX export with built-in validation, TensorRT engines."""
from .specs import GRAPH_NAMES, GraphSpec, TensorSpec, get_spec, graph_specs

__all__ = ["GRAPH_NAMES", "GraphSpec", "TensorSpec", "get_spec", "graph_specs"]
