"""Image loading (bad input, mode conversion, bomb guard) and numpy preprocessing."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.unit.conftest_data import bomb_png, encode, photo, truncated_jpeg, write_image
from coca_edge.data.preprocess import (
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
)


def _reason(src, **kwargs):
    with pytest.raises(ImageLoadError) as info:
        load_image(src, **kwargs)
    return info.value.reason


def test_missing_zero_byte_truncated_and_non_image(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "missing"
    (tmp_path / "empty.png").write_bytes(b"")
    assert _reason(tmp_path / "empty.png") == "empty"
    assert _reason(b"") == "empty"
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    assert _reason(tmp_path / "cut.jpg") == "truncated"
    png = encode(photo(), "PNG")
    assert _reason(png[: len(png) // 2]) == "truncated"
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    assert _reason(tmp_path / "notes.jpg") == "not_an_image"
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert _reason(tmp_path / "garbage.png") in ("corrupt", "not_an_image", "truncated")


def test_sources_path_bytes_and_stream(tmp_path):
    path = write_image(tmp_path / "a.png", seed=1)
    expected = np.asarray(Image.open(path).convert("RGB"))
    for src in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        img = load_image(src)
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_cmyk_is_converted():
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red
    buf = io.BytesIO()
    cmyk.save(buf, "TIFF")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB"
    assert np.asarray(img)[0, 0].tolist() == [255, 0, 0]
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (255, 0, 255, 0)).save(buf, "JPEG", quality=95)  # pure green
    r, g, b = np.asarray(load_image(buf.getvalue()))[8, 8].astype(int)
    assert g > 200 and r < 40 and b < 40  # JPEG is lossy; Adobe inversion is handled by Pillow


def test_rgba_alpha_dropped_by_default_or_composited():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 128
    data = encode(rgba, "PNG")
    dropped = np.asarray(load_image(data))
    assert dropped[1, 1].tolist() == [10, 20, 30]  # what open_clip's convert("RGB") does
    white = np.asarray(load_image(data, alpha_background=(255, 255, 255))).astype(int)
    assert white[0, 0].tolist() == [10, 20, 30]
    assert white[1, 1].tolist() == [255, 255, 255]
    assert np.all(np.abs(white[0, 1] - (np.array([10, 20, 30]) * 128 + 255 * 127) / 255) <= 1)


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert np.asarray(load_image(buf.getvalue()))[0, 0].tolist() == [200, 100, 50]
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=1)
    assert np.asarray(load_image(buf.getvalue(), alpha_background=(0, 255, 0)))[0, 0].tolist() == [0, 255, 0]
    assert np.asarray(load_image(buf.getvalue()))[0, 0].tolist() == [200, 100, 50]
    gif = io.BytesIO()
    Image.fromarray(photo(16, 16)).convert("P").save(gif, "GIF")
    assert load_image(gif.getvalue()).mode == "RGB"


def test_16bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    img = load_image(buf.getvalue())
    assert img.mode == "RGB"
    out = np.asarray(img)[0, :, 0].tolist()
    assert out == [0, 1, 128, 255]  # Pillow's convert("RGB") would give [0, 255, 255, 255]


def test_other_modes():
    for mode, value in (("L", 77), ("1", 1), ("LA", (77, 255))):
        img = Image.new(mode, (3, 3), value)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        assert load_image(buf.getvalue()).mode == "RGB"
    floats = Image.fromarray(np.full((2, 2), 0.5, np.float32))
    from coca_edge.data.preprocess import to_rgb

    assert np.asarray(to_rgb(floats))[0, 0].tolist() == [128, 128, 128]


def test_decompression_bomb_refused_from_header(monkeypatch):
    bomb = bomb_png()
    assert len(bomb) < 100_000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # an application turned Pillow's guard off

    def no_decode(self):
        raise AssertionError("a bomb must be refused before decoding")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert _reason(bomb) == "too_large"
    assert _reason(encode(photo(200, 200)), max_pixels=10_000) == "too_large"


def test_decompression_bomb_with_pillow_guard_on():
    assert _reason(bomb_png()) == "too_large"


def test_config_validation_and_round_trip():
    cfg = PreprocessConfig(image_size=(32, 48), mean=0.5, std=(0.2, 0.3, 0.4), resize_mode="longest", fill_color=9)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.size_hw == (32, 48)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert PreprocessConfig().mean == OPENAI_MEAN and PreprocessConfig().std == OPENAI_STD
    for bad in ({"image_size": 0}, {"image_size": (3,)}, {"std": (1, 0, 1)}, {"interpolation": "nearest"},
                {"resize_mode": "fit"}, {"mean": (1, 2)}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_dict({"image_size": 32, "colour": 1})
    oc = PreprocessConfig.from_open_clip({"size": 224, "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD,
                                         "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    assert oc == PreprocessConfig()


def test_normalize_matches_formula_and_shapes():
    cfg = PreprocessConfig(image_size=16)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    expected = (pixels.astype(np.float32) / np.float32(255) - np.float32(cfg.mean)) / np.float32(cfg.std)
    out = normalize(pixels, cfg)
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected.transpose(0, 3, 1, 2))
    assert normalize(pixels[0], cfg).shape == (3, 16, 16)
    with pytest.raises(ValueError):
        normalize(pixels.astype(np.float32), cfg)


def test_preprocess_paths_agree():
    cfg = PreprocessConfig(image_size=24)
    arr = photo(30, 40)
    from_pil = preprocess(Image.fromarray(arr), cfg)
    np.testing.assert_array_equal(from_pil, preprocess(arr, cfg))
    np.testing.assert_array_equal(from_pil, Preprocessor(cfg)(Image.fromarray(arr)))
    batch = preprocess_batch([arr, Image.fromarray(arr).convert("L")], cfg)
    assert batch.shape == (2, 3, 24, 24)
    np.testing.assert_array_equal(batch[0], from_pil)
    same_size = photo(24, 24)
    np.testing.assert_array_equal(preprocess_batch(same_size[None], cfg)[0], preprocess(Image.fromarray(same_size), cfg))
    assert preprocess_batch([], cfg).shape == (0, 3, 24, 24)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_resize_and_crop_output_size(mode):
    cfg = PreprocessConfig(image_size=(20, 30), resize_mode=mode, fill_color=255)
    for h, w in ((10, 50), (50, 10), (20, 30), (7, 7)):
        out = resize_and_crop(Image.fromarray(photo(h, w)), cfg)
        assert out.size == (30, 20)
    if mode == "longest":  # padding uses the fill colour
        out = np.asarray(resize_and_crop(Image.fromarray(photo(10, 50)), cfg))
        assert (out[0] == 255).all()


def test_data_package_imports_no_torch():
    code = (
        "import sys, coca_edge.data as d; "
        "d.SyntheticScenes('val', length=4)[0]; d.synthetic_tasks('val', 4); "
        "d.preprocess_batch(d.SyntheticScenes('val', length=2).batch([0, 1])[0], d.PreprocessConfig(image_size=64)); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
