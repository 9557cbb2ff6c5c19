"""Data for coca-edge: readers for image-caption datasets, torch-free preprocessing
identical to open_clip's, the embedded ``synthetic-scenes`` dataset and its evaluation
tasks. Nothing here imports torch (``webdataset``, which does, is imported only when a
``WebDatasetReader`` pass starts).

Preprocessing (what the edge runtime needs) is imported here; every other name is loaded on
first use (PEP 562), so the runtime does not pay for the readers, datasets and tasks."""
from __future__ import annotations

import importlib

# Eager, and it must be: ``preprocess`` is both a submodule and a function, and importing the
# submodule sets the package attribute to the module, which a lazy lookup would then return.
from .preprocess import *  # noqa: F401,F403
from .preprocess import __all__ as _EAGER

_EXPORTS = {
    "fashion_mnist": (
        "FASHION_MNIST_CLASSES", "FashionMNIST", "find_fashion_mnist",
    ),
    "preview": (
        "contact_sheet", "save_contact_sheet",
    ),
    "readers": (
        "IMAGE_EXTENSIONS", "BaseReader", "CocoCaptionsReader", "CsvReader", "DataError",
        "ImageFolderReader", "Sample", "SkipStats", "WebDatasetReader", "expand_urls",
    ),
    "synthetic": (
        "COLORS", "DATASET_NAME", "RELATIONS", "SHAPES", "SIZES", "SPLITS", "Scene", "SceneConfig",
        "SceneObject", "SyntheticScenes", "reference_captions", "render_scene", "write_synthetic",
    ),
    "tasks": (
        "CaptionTask", "ChoiceTask", "RetrievalTask", "ZeroShotTask", "parse_caption", "score_captions",
        "synthetic_tasks",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


__all__ = sorted((*_EAGER, *_MODULE_OF))
