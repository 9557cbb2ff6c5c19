"""Validation: accuracy drift of model variants against a reference (tensor and task level), gates, reports.

``validate(reference, candidates, ...)`` is the stage's verb; ``Validator`` keeps the
reference's outputs for repeated ``evaluate`` calls (the quantization fallback loop);
``localize`` ranks the FP32 nodes that add the most error; ``load_gates`` reads pass/fail
gates. See docs/validation.md for the metric names.
"""
from .data import EvalData, load_eval_data
from .gates import Gate, GateError, GateResult, Gates, load_gates, shipped_gates
from .localize import LocalizationError, NodeDrift, localize
from .metrics import TensorStats, caption_agreement, compare_tensors, per_sample_cosine, sqnr_db
from .models import IncompatibleModelsError, ModelSpecError, ModelUnderTest, TorchRunner, check_compatible, open_model
from .report import write_reports
from .validator import CandidateResult, ValidationReport, Validator, validate

__all__ = [
    "CandidateResult", "EvalData", "Gate", "GateError", "GateResult", "Gates", "IncompatibleModelsError",
    "LocalizationError", "ModelSpecError", "ModelUnderTest", "NodeDrift", "TensorStats", "TorchRunner",
    "ValidationReport", "Validator", "caption_agreement", "check_compatible", "compare_tensors", "load_eval_data",
    "load_gates", "localize", "open_model", "per_sample_cosine", "shipped_gates", "sqnr_db", "validate",
    "write_reports",
]
