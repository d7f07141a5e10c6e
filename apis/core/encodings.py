"""How tensors and masks are written in answers, and the size checks before them.

Dense tensors: base64 of raw little-endian values, plus ``shape`` and ``dtype``, or
(``response_format: npy``) the ``.npy`` file itself as the response body. float32 is the default
(what the seed clients decode); float16 halves the bytes on request and npy drops base64's third.
Sizes are checked before anything is computed, so nobody builds a 4 GB JSON by accident.

Binary masks of the segmentation routes (SAM 2, SAM 3): a PNG, COCO RLE, or the outline of the
largest component. The HTTP process imports this module for the types and size checks; OpenCV
and pycocotools load on first use, in the worker (apis/core/lazy.py).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pybase64
from PIL import Image

from apis.core.errors import APIError
from apis.core.lazy import lazy_module
from apis.core.replies import Reply, non_finite

cv2 = lazy_module("cv2")
coco_mask = lazy_module("pycocotools.mask")

OutputDType = Literal["float32", "float16"]
ResponseFormat = Literal["json", "npy"]
PaddingMode = Literal["constant", "reflect", "replicate", "circular"]
InterpolationMode = Literal["nearest", "nearest-exact", "bilinear", "bicubic", "area"]
TensorFormat = Literal["HWC", "CHW"]
_BITS = {"float32": 32, "float16": 16, "packbits": 1}  # per value on the wire, before base64


def base64_len(nbytes: int) -> int:
    return 4 * math.ceil(nbytes / 3)


def human_bytes(n: float) -> str:
    """``n`` bytes in words, to one decimal where it is not whole: 4 MiB, 173.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f}".removesuffix(".0") + f" {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def check_response_size(
    shape: Sequence[int], dtype: OutputDType | Literal["packbits"], limit: int, hint: str
) -> None:
    """Refuse, before computing it, a tensor whose base64 form would exceed ``limit`` bytes
    (``packbits``: 0/1 values sent as ``numpy.packbits`` bytes)."""
    nbytes = math.ceil(math.prod(shape) * _BITS[dtype] / 8)
    wire = base64_len(nbytes)
    dims = "x".join(str(s) for s in shape)
    check_answer_bytes(
        wire,
        f"the response would carry a {dims} {dtype} tensor: {human_bytes(nbytes)} raw, "
        f"{human_bytes(wire)} as base64",
        limit,
        hint,
    )


def check_answer_bytes(nbytes: int, what: str, limit: int, hint: str) -> None:
    """The one ``response_too_large`` refusal: ``what`` (the answer's size, said in words) is
    over ``limit`` bytes; ``hint`` says what to ask for instead."""
    if nbytes > limit:
        raise APIError(
            400,
            f"{what}, over this server's limit of {human_bytes(limit)}; {hint}",
            code="response_too_large",
        )


def encode_array(arr: np.ndarray, dtype: OutputDType = "float32") -> tuple[str, list[int]]:
    """(base64 of little-endian ``dtype`` values in C order, shape)."""
    out = finite_values(arr, dtype)
    return pybase64.b64encode_as_string(out), list(out.shape)


def finite_values(arr: np.ndarray, dtype: OutputDType) -> np.ndarray:
    """``arr`` as little-endian ``dtype``; a 500 if the model made NaN/inf, a 400 if the values
    only overflow the requested float16."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise non_finite("a returned tensor")
    out = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<"))
    if out.dtype != arr.dtype and not np.isfinite(out).all():
        raise APIError(
            400,
            f"the values exceed {dtype}'s range (largest magnitude {float(np.abs(arr).max()):g}); "
            "ask for output_dtype=float32",
            param="output_dtype",
        )
    return out


def tensor_answer(
    arr: np.ndarray, field: str, dtype: OutputDType, fmt: ResponseFormat, **meta: str | bool
) -> dict | Reply:
    """A route's answer carrying one tensor: JSON with ``field`` (base64), ``shape``, ``dtype``
    and ``meta``; or, for npy, the ``.npy`` bytes with ``meta`` (sent as ``X-Visionserve-*``
    headers)."""
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, finite_values(arr, dtype), allow_pickle=False)
        return Reply.npy(buf.getvalue(), meta)
    data, shape = encode_array(arr, dtype)
    return {field: data, "shape": shape, "dtype": dtype, **meta}


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
