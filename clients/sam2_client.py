"""SAM 2 client, seed 004 names: ``generate_sam2_auto_masks``, ``generate_sam2_prompt_masks``,
their ``*_decoded`` forms, the ``sam2_point_mask`` / ``sam2_box_mask`` / ``sam2_combined_mask``
shortcuts, mask decoding (every output mode, no pycocotools needed) and a PNG overlay writer.

``image`` is base64 text (as the seed sent) or anything :func:`encode_image` takes; the
``*_decoded`` helpers and shortcuts also take a file path. ``model_cfg`` / ``checkpoint_path``
only select among the server's models; None uses its default.

Embed once, prompt many: :func:`embed_sam2_image` answers the image's ``image_id`` (also
:func:`image_id` here, locally); pass ``image_id=`` to the prompt functions and the image is not
sent again. Pass the ``image`` too and it is re-sent by itself if the server evicted it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pybase64

from .common import (
    VisionServeError,
    content_id,
    decode_array,
    encode_image,
    get,
    image_arg,
    image_file_bytes,
    post_arguments,
)
from .masks import decode_png, decode_rle, save_overlay

__all__ = [
    "VisionServeError",
    "decode_prompt_answer",
    "decode_rle",
    "decode_segmentation",
    "embed_sam2_image",
    "encode_image",
    "encode_mask_input",
    "generate_sam2_auto_masks",
    "generate_sam2_auto_masks_decoded",
    "generate_sam2_prompt_masks",
    "generate_sam2_prompt_masks_decoded",
    "health",
    "image_id",
    "sam2_box_mask",
    "sam2_combined_mask",
    "sam2_point_mask",
    "save_mask_overlay",
    "unpack_bits",
]

FAMILY = "sam2"
PromptAnswer = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # low_res_masks None when not asked for


def health(base_url: str | None = None, api_key: str | None = None) -> dict:
    return get(FAMILY, "health", base_url, api_key)


def image_id(image: Any) -> str:
    """The ``image_id`` the server gives ``image`` (a file path, bytes, PIL image or array; arrays
    and PIL images as the PNG this client sends), computed locally: the SHA-256 of its file."""
    return content_id(image_file_bytes(image))


def embed_sam2_image(
    image: Any = None,
    model_cfg: str | None = None,
    checkpoint_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """POST /sam2/embed: encode the image into the server's cache once. Answers ``image_id``,
    ``width``, ``height``, ``cached`` (already there) and ``model``. ``image`` may be a path."""
    image = image_arg(image)
    return post_arguments(FAMILY, "embed", locals(), image_key=True)


def generate_sam2_auto_masks(
    image: Any = None,
    preset: str = "fine_grained",
    points_per_side: int | None = None,
    points_per_batch: int | None = None,
    pred_iou_thresh: float | None = None,
    stability_score_thresh: float | None = None,
    stability_score_offset: float | None = None,
    mask_threshold: float | None = None,
    box_nms_thresh: float | None = None,
    crop_n_layers: int | None = None,
    crop_nms_thresh: float | None = None,
    crop_overlap_ratio: float | None = None,
    crop_n_points_downscale_factor: int | None = None,
    point_grids: Any = None,
    min_mask_region_area: float | None = None,
    use_m2m: bool | None = None,
    multimask_output: bool | None = None,
    output_mode: str = "binary_mask",
    mask_encoding: str = "float32",
    model_cfg: str | None = None,
    checkpoint_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
    image_id: str | None = None,
) -> dict:
    """POST /sam2/auto_mask; the JSON answer (``masks``, ``num_masks``, ``settings``, ...).

    Generator fields left None take the ``preset``'s values. ``image_id`` instead of the image:
    see the module's docstring.
    """
    if point_grids is not None:
        point_grids = [np.asarray(g, dtype=float).tolist() for g in point_grids]
    return post_arguments(FAMILY, "auto_mask", locals(), image_key=True)


def _as_list(value: Any) -> Any:
    """JSON-ready prompts: numpy arrays (or nested lists of them) become plain lists."""
    return None if value is None else np.asarray(value).tolist()


def encode_mask_input(mask: np.ndarray) -> tuple[str, list[int]]:
    """(base64, shape) of low-res logits for ``mask_input``; an (L, L) array becomes [1, L, L]."""
    arr = np.asarray(mask, dtype="<f4")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"mask_input must be (L, L) or (1, L, L) logits, got shape {arr.shape}")
    return pybase64.b64encode_as_string(np.ascontiguousarray(arr).tobytes()), list(arr.shape)


def generate_sam2_prompt_masks(
    image: Any = None,
    point_coords: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask_input: Any = None,
    mask_input_shape: list[int] | None = None,
    multimask_output: bool = True,
    return_logits: bool = False,
    normalize_coords: bool = True,
    mask_threshold: float = 0.0,
    max_hole_area: float = 0.0,
    max_sprinkle_area: float = 0.0,
    model_cfg: str | None = None,
    checkpoint_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
    mask_encoding: str = "float32",
    image_id: str | None = None,
    best_only: bool = False,
    return_low_res_masks: bool = True,
    low_res_dtype: str = "float32",
) -> PromptAnswer:
    """POST /sam2/prompt_mask; (masks [C, H, W], iou_predictions [C], low_res_masks [C, L, L]).

    ``mask_input`` is a numpy array (e.g. ``low_res[i]`` of an earlier answer) or base64 text
    with ``mask_input_shape``. ``mask_encoding="packbits"`` (32x smaller) or ``"coco_rle"``
    (smaller still for one object) shrink the answer's masks on the wire; they decode to the
    same float32 0/1 array. For clicks: ``best_only=True`` answers the one mask of highest
    predicted IoU, ``return_low_res_masks=False`` leaves the logits out (low_res_masks is then
    None), ``low_res_dtype="float16"`` halves them (decoded to float32). ``image_id`` instead of
    the image: see the module's docstring.
    """
    if mask_input is not None and not isinstance(mask_input, str):
        mask_input, mask_input_shape = encode_mask_input(mask_input)
    point_coords, point_labels, box = _as_list(point_coords), _as_list(point_labels), _as_list(box)
    r = post_arguments(FAMILY, "prompt_mask", locals(), image_key=True)
    return decode_prompt_answer(r)


def decode_prompt_answer(r: dict) -> PromptAnswer:
    """(masks [C, H, W] float32, iou_predictions [C], low_res_masks [C, L, L] float32 or None)
    of a prompt_mask answer, in whichever mask_encoding and low_res_dtype it came."""
    encoding = r.get("mask_encoding")
    if encoding == "packbits":
        masks = unpack_bits(r["masks"], r["masks_shape"]).astype(np.float32)
    elif encoding == "coco_rle":
        masks = np.zeros(r["masks_shape"], dtype=np.float32)
        for out, rle in zip(masks, r["masks"], strict=True):
            out[decode_rle(rle)] = 1.0
    else:
        masks = decode_array(r["masks"], r["masks_shape"])
    low = None
    if r.get("low_res_masks") is not None:
        low = decode_array(r["low_res_masks"], r["low_res_shape"], r.get("low_res_dtype", "float32"))
    return (
        masks,
        decode_array(r["iou_predictions"], r["iou_shape"]),
        None if low is None else low.astype(np.float32),
    )


# ----------------------------------------------------------------------------- decoding


def unpack_bits(data: str | bytes, shape: Sequence[int]) -> np.ndarray:
    """Bool array of ``shape`` from ``numpy.packbits`` bytes (or their base64) in C order."""
    raw = pybase64.b64decode(data) if isinstance(data, str) else data
    n = math.prod(shape)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"packbits data has {len(raw)} bytes, shape {list(shape)} needs {(n + 7) // 8}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).reshape(shape).astype(bool)


def decode_segmentation(mask: dict, encoding: str | None = None) -> np.ndarray:
    """(H, W) bool mask of one ``auto_mask`` entry, whatever its output mode.

    ``encoding`` is the answer's ``mask_encoding``; without it binary masks are recognised by
    their PNG signature or their length.
    """
    seg = mask["segmentation"]
    if isinstance(seg, np.ndarray):  # already decoded
        return seg.astype(bool, copy=False)
    if isinstance(seg, dict):
        return decode_rle(seg)
    h, w = (int(v) for v in mask["segmentation_shape"])
    raw = pybase64.b64decode(seg)
    if encoding is None:
        encoding = "png" if raw.startswith(b"\x89PNG") else "float32" if len(raw) == h * w * 4 else "packbits"
    if encoding == "float32":
        return decode_array(seg, [h, w]) > 0.5
    if encoding == "packbits":
        return unpack_bits(raw, (h, w))
    if encoding != "png":
        raise ValueError(f"unknown mask_encoding {encoding!r}")
    return decode_png(raw, (h, w))


def generate_sam2_auto_masks_decoded(image: Any = None, **kwargs) -> list[dict]:
    """Like :func:`generate_sam2_auto_masks` (``image`` may be a path) with each
    ``segmentation`` as an (H, W) bool array, whatever output mode and encoding were asked for."""
    r = generate_sam2_auto_masks(image_arg(image), **kwargs)
    encoding = r.get("mask_encoding")
    return [{**m, "segmentation": decode_segmentation(m, encoding)} for m in r["masks"]]


def generate_sam2_prompt_masks_decoded(image: Any = None, **kwargs) -> PromptAnswer:
    """Like :func:`generate_sam2_prompt_masks`, but ``image`` may also be a file path."""
    return generate_sam2_prompt_masks(image_arg(image), **kwargs)


def sam2_point_mask(
    image: Any = None, point_coords: Any = None, point_labels: Any = None, **kwargs
) -> PromptAnswer:
    """Masks from clicks: ``point_labels`` 1 keeps the point's object, 0 excludes it."""
    return generate_sam2_prompt_masks_decoded(
        image, point_coords=point_coords, point_labels=point_labels, **kwargs
    )


def sam2_box_mask(image: Any = None, box: Any = None, **kwargs) -> PromptAnswer:
    """Masks of the object inside ``box`` [x1, y1, x2, y2] (pixels)."""
    return generate_sam2_prompt_masks_decoded(image, box=box, **kwargs)


def sam2_combined_mask(
    image: Any = None, point_coords: Any = None, point_labels: Any = None, box: Any = None, **kwargs
) -> PromptAnswer:
    """Masks from a box refined by clicks, for objects a box alone leaves ambiguous."""
    return generate_sam2_prompt_masks_decoded(
        image, point_coords=point_coords, point_labels=point_labels, box=box, **kwargs
    )


def save_mask_overlay(image: Any, masks: Any, path: str | Path, alpha: float = 0.5, seed: int = 0) -> Path:
    """Write a PNG of ``image`` (path, PIL image or uint8 array) with each mask blended in its
    own colour, to check masks by eye; ``masks``: (H, W) bool or 0/1 arrays, an (N, H, W) array,
    or auto-mask dicts (decoded or not). Colours depend only on ``seed`` and the mask's index."""
    arrays = [decode_segmentation(m) if isinstance(m, dict) else m for m in masks]
    return save_overlay(image, arrays, path, alpha=alpha, seed=seed)
