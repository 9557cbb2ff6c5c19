"""Contact sheets: a PNG grid of samples with their captions, to look at what a model
learns from."""
from __future__ import annotations

import os
import textwrap
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .readers import Sample

__all__ = ["contact_sheet", "save_contact_sheet"]


def _as_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr)
    raise TypeError(
        f"contact sheets need PIL images or uint8 [H, W, 3] arrays, got {type(image).__name__} "
        f"{getattr(arr, 'dtype', '')} {getattr(arr, 'shape', '')}; read samples without a transform"
    )


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for chars in range(max(8, width // 4), 4, -2):
        lines = textwrap.wrap(text, chars) or [""]
        if all(draw.textlength(line, font=font) <= width for line in lines):
            return lines
    return lines


def contact_sheet(
    samples: Iterable[Sample],
    *,
    cols: int = 4,
    cell: int = 192,
    caption_lines: int = 4,
    font_size: int = 12,
) -> Image.Image:
    """Grid of ``cell``-px images (small images upscaled with nearest neighbour, so
    pixels stay visible), each with its caption and id below."""
    samples = list(samples)
    if not samples:
        raise ValueError("no samples to show")
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 3
    pad = 6
    text_h = line_h * (caption_lines + 1)
    cell_w, cell_h = cell + 2 * pad, cell + text_h + 2 * pad
    rows = -(-len(samples) // cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, sample in enumerate(samples):
        img = _as_image(sample.image)
        scale = cell / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BICUBIC
        img = img.resize(size, resample)
        x0, y0 = (k % cols) * cell_w + pad, (k // cols) * cell_h + pad
        sheet.paste(img, (x0 + (cell - size[0]) // 2, y0 + (cell - size[1]) // 2))
        lines = _wrap(draw, sample.caption or "(no caption)", font, cell)
        if len(lines) > caption_lines:
            lines = lines[: caption_lines - 1] + [lines[caption_lines - 1] + " ..."]
        for j, line in enumerate(lines):
            draw.text((x0, y0 + cell + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
        draw.text((x0, y0 + cell + 2 + caption_lines * line_h), str(sample.id)[-40:], fill=(140, 140, 140), font=font)
    return sheet


def save_contact_sheet(samples: Iterable[Sample], out: str | os.PathLike[str], **kwargs: Any) -> str:
    """Write ``contact_sheet(samples, **kwargs)`` as PNG; returns the path."""
    out = os.fspath(out)
    folder = os.path.dirname(out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    contact_sheet(samples, **kwargs).save(out, "PNG")
    return out
