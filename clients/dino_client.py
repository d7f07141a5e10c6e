"""DINO client, seed 004 names: ``extract_dino_features``, ``decode_features`` and
``extract_dino_features_decoded``; plus ``embed_dino`` (global image embeddings).

``image`` is base64 text (as the seed sent) or anything :func:`encode_image` takes (path,
bytes, PIL image, uint8 array); ``image_url`` / ``image_path`` work when the server allows them.
``model_type`` left as None uses the server's default model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import VisionServeError, decode_array, encode_image, get, image_arg, post_arguments

__all__ = [
    "VisionServeError",
    "decode_features",
    "embed_dino",
    "encode_image",
    "extract_dino_features",
    "extract_dino_features_decoded",
    "health",
]

FAMILY = "dino"


def health(base_url: str | None = None, api_key: str | None = None) -> dict:
    return get(FAMILY, "health", base_url, api_key)


def extract_dino_features(
    image: Any = None,
    model_type: str | None = None,
    stride: int | None = None,
    ret_pca: bool = False,
    ret_patches: bool = True,
    load_size: int | None = -1,
    facet: str = "token",
    layer: int = -1,
    bin: bool = False,
    pca_niter: int = 5,
    pca_q_min: float = 0.01,
    pca_q_max: float = 0.99,
    interpolation_mode: str = "bilinear",
    tensor_format: str = "HWC",
    padding_mode: str = "constant",
    output_dtype: str = "float32",
    response_format: str = "json",
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """POST /dino/extract; returns the JSON (``features``, ``shape``, ``dtype``, ``is_pca``)."""
    return post_arguments(FAMILY, "extract", locals())


def decode_features(features_b64: str, shape: list[int], dtype: str = "float32") -> np.ndarray:
    return decode_array(features_b64, shape, dtype)


def extract_dino_features_decoded(image: Any, response_format: str = "npy", **kwargs) -> np.ndarray:
    """Like :func:`extract_dino_features` (``image`` may be a file path) but returns the array;
    it travels as .npy unless ``response_format="json"``."""
    r = extract_dino_features(image_arg(image), response_format=response_format, **kwargs)
    return r["array"] if "array" in r else decode_features(r["features"], r["shape"], r["dtype"])


def embed_dino(
    images: list[Any],
    model_type: str | None = None,
    pooling: str = "cls",
    normalize: bool = False,
    output_dtype: str = "float32",
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> np.ndarray:
    """POST /dino/embed: (N, D) embeddings, the class token (``pooling="cls"``) or the mean of
    the patch tokens (``"mean"``), L2-normalised if ``normalize``. ``images``: file paths, bytes,
    PIL images or uint8 arrays; at most the server's ``limits.max_embed_inputs``."""
    images = [encode_image(image) for image in images]
    r = post_arguments(FAMILY, "embed", locals())
    return decode_array(r["embeddings"], r["shape"], r["dtype"])
