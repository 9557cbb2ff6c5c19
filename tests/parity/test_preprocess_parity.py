"""numpy + Pillow preprocessing vs open_clip's torchvision transform, on real photographs.

scikit-image ships the photos (CC0 / public domain); open_clip is the oracle.
"""
from __future__ import annotations

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
skimage_data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

from coca_edge.data.preprocess import PreprocessConfig, load_image, preprocess  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # camera: 8-bit grayscale
# The bound: 1/255 per pixel in [0, 1] units, i.e. 1/255/std after Normalize.
# Measured: 0.0 (bit-identical), since both sides resize with the same Pillow call.
TOLERANCE = 1.0 / 255 / min(PreprocessConfig().std)


@pytest.fixture(scope="module", params=PHOTOS)
def photo(request):
    return Image.fromarray(getattr(skimage_data, request.param)())


@pytest.mark.parametrize(
    "size,mode",
    [(224, "shortest"), (64, "shortest"), (32, "shortest"), ((192, 256), "shortest"), (224, "longest"), (224, "squash")],
)
def test_matches_open_clip_transform(photo, size, mode):
    reference = open_clip.image_transform(size, is_train=False, resize_mode=mode)(photo).numpy()
    ours = preprocess(photo, PreprocessConfig(image_size=size, resize_mode=mode))
    assert ours.shape == reference.shape and ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_matches_through_encoded_files(tmp_path):
    """Decoding the same JPEG/PNG file: our loader vs the PIL.Image.open open_clip uses."""
    cfg = PreprocessConfig(image_size=224)
    transform = open_clip.image_transform(224, is_train=False)
    for name in ("coffee", "chelsea"):
        for fmt in ("JPEG", "PNG"):
            path = tmp_path / f"{name}.{fmt.lower()}"
            Image.fromarray(getattr(skimage_data, name)()).save(path, fmt)
            reference = transform(Image.open(path)).numpy()
            ours = preprocess(load_image(path), cfg)
            assert np.abs(ours - reference).max() <= TOLERANCE


def test_mean_std_of_a_model_config():
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    img = Image.fromarray(skimage_data.astronaut())
    reference = open_clip.image_transform(64, is_train=False, mean=mean, std=std)(img).numpy()
    assert np.abs(preprocess(img, PreprocessConfig(image_size=64, mean=mean, std=std)) - reference).max() <= 1 / 255 / 0.5
