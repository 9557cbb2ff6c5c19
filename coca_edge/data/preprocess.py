"""Image loading and inference preprocessing in numpy + Pillow, identical to open_clip's.

open_clip's eval transform is ``Resize(bicubic, shortest side) -> CenterCrop ->
convert("RGB") -> ToTensor -> Normalize``. The geometric steps here call the same Pillow
resampling that torchvision calls for PIL images, with torchvision's size and crop
arithmetic, so on RGB photographs the result is the same float32 array (parity test:
``tests/parity/test_preprocess_parity.py``).

Deliberate differences, all on images that are not plain RGB:

- the image is converted to RGB *before* resizing (open_clip resizes in the file's mode
  and converts afterwards); for 8-bit RGB and grayscale the two orders agree;
- 16-bit grayscale is scaled to 8 bit (Pillow's ``convert`` clips every value above 255
  to white);
- alpha is dropped by default (what open_clip's ``convert("RGB")`` does) but can be
  composited over a background colour instead (``alpha_background``).

EXIF orientation is not applied, as in open_clip.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "PreprocessConfig",
    "Preprocessor",
    "load_image",
    "to_rgb",
    "resize_and_crop",
    "normalize",
    "preprocess",
    "preprocess_batch",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's own default for Image.MAX_IMAGE_PIXELS (~89.5 MP: a 1024 MB 24-bit image).
# Kept as our constant because applications may set Pillow's global to None.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

_INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageLoadError(ValueError):
    """One image could not be used. ``reason`` is a short key readers count skips by:
    missing, empty, not_an_image, truncated, corrupt, too_large, unsupported_mode."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PreprocessConfig:
    """Inference preprocessing of a model; stored in bundles as ``to_dict()``.

    ``image_size`` is an int (square) or ``(height, width)``. Defaults are open_clip's
    (OpenAI mean/std, bicubic, shortest-side resize).
    """

    image_size: Union[int, tuple[int, int]] = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                raise ValueError(f"image_size must be an int or (height, width), got {size!r}")
            object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        elif not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"image_size must be a positive int or (height, width), got {size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (float(value),) * 3
            value = tuple(float(v) for v in value)
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {value!r}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {self.interpolation!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if not 0 <= int(self.fill_color) <= 255:
            raise ValueError(f"fill_color must be in 0..255, got {self.fill_color!r}")

    @property
    def size_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_size"] = self.image_size if isinstance(self.image_size, int) else list(self.image_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    @classmethod
    def from_open_clip(cls, cfg: Any) -> "PreprocessConfig":
        """From open_clip's ``PreprocessCfg`` (or its dict, e.g. ``model.visual.preprocess_cfg``)."""
        data = cfg if isinstance(cfg, dict) else asdict(cfg)
        mode = data.get("mode", "RGB")
        if mode != "RGB":
            raise ValueError(f"only RGB models are supported, open_clip config has mode {mode!r}")
        return cls(
            image_size=tuple(data["size"]) if isinstance(data["size"], (list, tuple)) else data["size"],
            mean=data.get("mean") or OPENAI_MEAN,
            std=data.get("std") or OPENAI_STD,
            interpolation=data.get("interpolation") or "bicubic",
            resize_mode=data.get("resize_mode") or "shortest",
            fill_color=data.get("fill_color", 0),
        )


def load_image(
    src: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    alpha_background: tuple[int, int, int] | None = None,
) -> Image.Image:
    """Open an image file, bytes or binary stream and return it decoded as RGB.

    Raises ``ImageLoadError`` (never a bare Pillow error) with a ``reason``. Images with
    more than ``max_pixels`` pixels are refused from their header, before any pixel is
    decoded, so a decompression bomb costs nothing.
    """
    name = "<bytes>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageLoadError("empty", "zero-byte image data")
        fp: Any = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        fp, name = src, getattr(src, "name", "<stream>")
    else:
        name = os.fspath(src)
        try:
            size = os.path.getsize(name)
        except FileNotFoundError:
            raise ImageLoadError("missing", f"{name}: no such file") from None
        except OSError as exc:
            raise ImageLoadError("missing", f"{name}: {exc}") from None
        if size == 0:
            raise ImageLoadError("empty", f"{name}: zero-byte file")
        fp = name
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its limit; a bomb is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageLoadError("not_an_image", f"{name}: not a recognised image format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError("too_large", f"{name}: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageLoadError("corrupt", f"{name}: {exc}") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageLoadError(
            "too_large", f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    try:
        img.load()
    except MemoryError:
        raise ImageLoadError("too_large", f"{name}: out of memory decoding {width}x{height}") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        reason = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise ImageLoadError(reason, f"{name}: {exc}") from None
    return to_rgb(img, alpha_background)


def to_rgb(img: Image.Image, alpha_background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit and 32-bit integer grayscale are scaled from the 16-bit range (``I`` images
    whose values all fit in 8 bits are taken as 8-bit); float images in [0, 1] are scaled
    by 255, others clipped. Alpha is dropped unless ``alpha_background`` is given.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
            gray = values.astype(np.uint8)
        else:
            gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
        img = img.convert(mode)
        if mode == "RGB":
            return img
    if mode in _ALPHA_MODES:
        if alpha_background is None:
            return img.convert("RGB")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, tuple(alpha_background) + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError("unsupported_mode", f"cannot convert image mode {img.mode!r} to RGB: {exc}") from None


def _resized_size(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int]:
    """(width, height) after resizing, with torchvision's / open_clip's arithmetic."""
    target_h, target_w = cfg.size_hw
    if cfg.resize_mode == "squash":
        return target_w, target_h
    if cfg.resize_mode == "shortest" and target_h == target_w:
        # torchvision Resize(int): the long side is truncated, not rounded.
        if width <= height:
            return target_w, int(target_w * height / width)
        return int(target_h * width / height), target_h
    # open_clip ResizeKeepRatio (longest=1 for 'longest', 0 for non-square 'shortest').
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = max(ratio_h, ratio_w) if cfg.resize_mode == "longest" else min(ratio_h, ratio_w)
    return round(width / ratio), round(height / ratio)


def resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize and center-crop (or pad, for 'longest') a PIL image to ``cfg.size_hw``."""
    new_w, new_h = _resized_size(img.width, img.height, cfg)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    crop_h, crop_w = cfg.size_hw
    if (img.height, img.width) == (crop_h, crop_w):
        return img
    if crop_w > img.width or crop_h > img.height:
        left = (crop_w - img.width) // 2 if crop_w > img.width else 0
        top = (crop_h - img.height) // 2 if crop_h > img.height else 0
        padded_w = img.width + left + ((crop_w - img.width + 1) // 2 if crop_w > img.width else 0)
        padded_h = img.height + top + ((crop_h - img.height + 1) // 2 if crop_h > img.height else 0)
        fill = int(cfg.fill_color)
        canvas = Image.new(img.mode, (padded_w, padded_h), (fill,) * len(img.getbands()))
        canvas.paste(img, (left, top))
        img = canvas
        if (img.height, img.width) == (crop_h, crop_w):
            return img
    # Python's round (half to even), as torchvision's center_crop.
    top = int(round((img.height - crop_h) / 2.0))
    left = int(round((img.width - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


_LUT_CACHE: dict[tuple, np.ndarray] = {}


def _lut(cfg: PreprocessConfig) -> np.ndarray:
    """[3, 256] float32 table: value v of channel c -> (v / 255 - mean[c]) / std[c].

    Computed with the same float32 operations as ToTensor + Normalize, so a lookup
    gives the same numbers.
    """
    key = (cfg.mean, cfg.std)
    table = _LUT_CACHE.get(key)
    if table is None:
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
        std = np.asarray(cfg.std, dtype=np.float32)[:, None]
        table = (levels[None, :] - mean) / std
        table.setflags(write=False)
        _LUT_CACHE[key] = table
    return table


def normalize(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 ``[H, W, 3]`` or ``[N, H, W, 3]`` -> float32 ``[3, H, W]`` / ``[N, 3, H, W]``."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4) or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 [..., H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    table = _lut(cfg)
    out = np.empty(pixels.shape[:-3] + (3,) + pixels.shape[-3:-1], dtype=np.float32)
    for c in range(3):
        out[..., c, :, :] = table[c][pixels[..., c]]
    return out


def _as_rgb_image(img: Union[Image.Image, np.ndarray]) -> Image.Image:
    if isinstance(img, Image.Image):
        return to_rgb(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"numpy images must be [H, W] or [H, W, 3], got {arr.shape}")
    return Image.fromarray(arr)


def _pixels(img: Union[Image.Image, np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[:2] == cfg.size_hw:
        return img  # already at the model's size: resize and crop are the identity
    return np.asarray(resize_and_crop(_as_rgb_image(img), cfg))


def preprocess(img: Union[Image.Image, np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """PIL image (any mode) or uint8 ``[H, W(, 3)]`` array -> float32 ``[3, H, W]``."""
    return normalize(_pixels(img, cfg), cfg)


def preprocess_batch(images: Sequence[Union[Image.Image, np.ndarray]], cfg: PreprocessConfig) -> np.ndarray:
    """Images -> float32 ``[N, 3, H, W]``; a uint8 ``[N, H, W, 3]`` array at the model's size
    is normalised in one step."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[1:3] == cfg.size_hw and images.shape[3] == 3 and images.dtype == np.uint8:
            return normalize(images, cfg)
        images = list(images)
    height, width = cfg.size_hw
    if len(images) == 0:
        return np.empty((0, 3, height, width), dtype=np.float32)
    return normalize(np.stack([_pixels(img, cfg) for img in images]), cfg)


class Preprocessor:
    """``transform=`` callable for readers: PIL image -> float32 ``[3, H, W]``."""

    def __init__(self, cfg: PreprocessConfig | None = None):
        self.cfg = cfg or PreprocessConfig()

    def __call__(self, img: Union[Image.Image, np.ndarray]) -> np.ndarray:
        return preprocess(img, self.cfg)

    def __repr__(self) -> str:
        return f"Preprocessor({self.cfg!r})"

