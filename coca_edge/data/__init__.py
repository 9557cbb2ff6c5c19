"""Data for coca-edge: readers for image-caption datasets, torch-free preprocessing
identical to open_clip's, the embedded ``synthetic-scenes`` dataset and its evaluation
tasks. Nothing here imports torch (``webdataset``, which does, is imported only when a
``WebDatasetReader`` pass starts)."""
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, find_fashion_mnist
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    OPENAI_MEAN,
    OPENAI_STD,
    ImageLoadError,
    PreprocessConfig,
    Preprocessor,
    load_image,
    normalize,
    preprocess,
    preprocess_batch,
    resize_and_crop,
    to_rgb,
)
from .preview import contact_sheet, save_contact_sheet
from .readers import (
    IMAGE_EXTENSIONS,
    BaseReader,
    CocoCaptionsReader,
    CsvReader,
    DataError,
    ImageFolderReader,
    Sample,
    SkipStats,
    WebDatasetReader,
    expand_urls,
)
from .synthetic import (
    COLORS,
    DATASET_NAME,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Scene,
    SceneConfig,
    SceneObject,
    SyntheticScenes,
    reference_captions,
    render_scene,
    write_synthetic,
)
from .tasks import (
    CaptionTask,
    ChoiceTask,
    RetrievalTask,
    ZeroShotTask,
    parse_caption,
    score_captions,
    synthetic_tasks,
)

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
