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
from .preprocess import (DEFAULT_MAX_PIXELS, OPENAI_MEAN, OPENAI_STD, ImageLoadError, PreprocessConfig, Preprocessor,
                         load_image, normalize, preprocess, preprocess_batch, resize_and_crop, to_rgb)

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


__all__ = [
    "BaseReader", "COLORS", "CaptionTask", "ChoiceTask", "CocoCaptionsReader", "CsvReader", "DATASET_NAME",
    "DEFAULT_MAX_PIXELS", "DataError", "FASHION_MNIST_CLASSES", "FashionMNIST", "IMAGE_EXTENSIONS",
    "ImageFolderReader", "ImageLoadError", "OPENAI_MEAN", "OPENAI_STD", "PreprocessConfig", "Preprocessor",
    "RELATIONS", "RetrievalTask", "SHAPES", "SIZES", "SPLITS", "Sample", "Scene", "SceneConfig", "SceneObject",
    "SkipStats", "SyntheticScenes", "WebDatasetReader", "ZeroShotTask", "contact_sheet", "expand_urls",
    "find_fashion_mnist", "load_image", "normalize", "parse_caption", "preprocess", "preprocess_batch",
    "reference_captions", "render_scene", "resize_and_crop", "save_contact_sheet", "score_captions",
    "synthetic_tasks", "to_rgb", "write_synthetic",
]
