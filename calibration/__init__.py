"""Calibration feeds per graph (installed as ``coca_edge.calibration``): datasets -> feeds in
ONNX Runtime's ``CalibrationDataReader`` contract, decoder feeds recorded from the runtime's
own generation loop, and an on-disk cache of calibration ranges."""
from .cache import default_cache_dir, range_cache_key, range_cache_path, store_ranges
from .sources import (
    GRAPH_INPUTS,
    CalibrationData,
    CalibrationError,
    CalibrationSet,
    FeedReader,
    RecordingRunner,
    open_dataset,
)

__all__ = ["CalibrationData", "CalibrationError", "CalibrationSet", "FeedReader", "GRAPH_INPUTS", "RecordingRunner",
           "default_cache_dir", "open_dataset", "range_cache_key", "range_cache_path", "store_ranges"]
