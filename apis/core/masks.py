"""Binary-mask encodings and outlines shared by the segmentation routes (SAM 2, SAM 3)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pybase64
from PIL import Image
from pycocotools import mask as coco_mask


def png_base64(mask: np.ndarray) -> str:
    """(H, W) mask as a base64 8-bit greyscale PNG, 0 or 255 (any image tool opens it)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG")
    return pybase64.b64encode_as_string(buf.getvalue())


def coco_rle(mask: np.ndarray) -> dict:
    """(H, W) mask as COCO compressed RLE, ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def largest_polygon(mask: np.ndarray, epsilon_factor: float) -> tuple[list[list[int]], float] | None:
    """Outline of the mask's largest external contour, simplified by ``cv2.approxPolyDP`` with
    epsilon = ``epsilon_factor`` x the contour's perimeter, and the area of that polygon.
    None for an empty mask. ``epsilon_factor`` 0 keeps every corner of the contour."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    approx = cv2.approxPolyDP(contour, epsilon_factor * cv2.arcLength(contour, True), True)
    return approx.reshape(-1, 2).tolist(), float(cv2.contourArea(approx))
