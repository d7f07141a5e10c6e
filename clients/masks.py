"""Mask decoding and drawing shared by the segmentation clients; numpy and Pillow only."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pybase64


def _coco_counts(text: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string: 5 bits per character (offset 48), the 6th
    bit continues a number, the last bit read is its sign; from the third run on, each value
    is a difference to the run two places back."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """(H, W) bool mask from ``{"size": [H, W], "counts": ...}``: a COCO string or a list of
    run lengths (column-major, starting with background), as SAM writes them."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = np.asarray(_coco_counts(counts) if isinstance(counts, str) else counts, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != h * w:
        raise ValueError(f"RLE runs add up to {runs.sum()}, not {h}x{w} = {h * w} pixels")
    flat = np.repeat(np.arange(runs.size) % 2 == 1, runs)  # runs alternate background, mask
    return np.ascontiguousarray(flat.reshape(w, h).T)


def decode_png(data: str | bytes, shape: Sequence[int] | None = None) -> np.ndarray:
    """(H, W) bool mask from a (base64) PNG: every non-zero pixel is in the mask."""
    from PIL import Image

    raw = pybase64.b64decode(data) if isinstance(data, str) else data
    out = np.asarray(Image.open(io.BytesIO(raw)).convert("L")) > 0
    if shape is not None and out.shape != tuple(int(v) for v in shape):
        raise ValueError(f"PNG mask is {out.shape}, expected {tuple(shape)}")
    return out


def save_overlay(
    image: Any,
    masks: Sequence[np.ndarray],
    path: str | Path,
    polygons: Sequence[Sequence[Sequence[float]]] = (),
    alpha: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write a PNG of ``image`` (path, PIL image or uint8 array) with each mask blended in its
    own colour and each polygon outlined in the colour of the same index, to check results by
    eye. Colours depend only on ``seed`` and the index.

    A file is shown as the server decodes it, turned by its EXIF orientation (the clients send
    its bytes as they are); PIL images and arrays go out as PNG without EXIF, so they are drawn
    as given.
    """
    from PIL import Image, ImageDraw, ImageOps

    if isinstance(image, (str, Path)):
        image = ImageOps.exif_transpose(Image.open(image))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    colours = np.random.default_rng(seed).integers(40, 256, size=(max(len(masks), len(polygons)), 3))
    for mask, colour in zip(masks, colours, strict=False):
        m = np.asarray(mask) > 0.5
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask of shape {m.shape} does not fit an image of {out.shape[:2]}")
        out[m] = (1 - alpha) * out[m] + alpha * colour
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for polygon, colour in zip(polygons, colours, strict=False):
        points = [(float(x), float(y)) for x, y in polygon]
        if len(points) > 1:
            draw.line([*points, points[0]], fill=tuple(int(c) for c in colour), width=2)
        elif points:
            draw.point(points, fill=tuple(int(c) for c in colour))
    path = Path(path)
    canvas.save(path, format="PNG")
    return path
