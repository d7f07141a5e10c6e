"""CLIP client, seed 004 names: ``extract_clip_features``, ``encode_clip_text``,
``compute_clip_similarity``, their ``*_decoded`` forms and the decode helpers; plus
``embed_clip`` (global image/text embeddings) and ``classify_clip`` (zero-shot labels).

``image`` is base64 text (as the seed sent) or anything :func:`encode_image` takes (path,
bytes, PIL image, uint8 array); ``image_url`` / ``image_path`` work when the server allows them.
``model_name`` / ``model_pretrained`` left as None use the server's default model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .common import VisionServeError, decode_array, encode_image, get, image_arg, post_arguments

__all__ = [
    "VisionServeError",
    "classify_clip",
    "embed_clip",
    "compute_clip_similarity",
    "compute_clip_similarity_decoded",
    "decode_features",
    "decode_similarity_map",
    "decode_text_embedding",
    "encode_clip_text",
    "encode_clip_text_decoded",
    "encode_image",
    "extract_clip_features",
    "extract_clip_features_decoded",
    "health",
]

FAMILY = "clip"


def health(base_url: str | None = None, api_key: str | None = None) -> dict:
    return get(FAMILY, "health", base_url, api_key)


def extract_clip_features(
    image: Any = None,
    model_name: str | None = None,
    model_pretrained: str | None = None,
    ret_pca: bool = False,
    ret_patches: bool = True,
    load_size: int | None = 1024,
    center_crop: bool = False,
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
    """POST /clip/extract; returns the JSON (``features``, ``shape``, ``dtype``, ``is_pca``)."""
    return post_arguments(FAMILY, "extract", locals())


def encode_clip_text(
    text: str,
    model_name: str | None = None,
    model_pretrained: str | None = None,
    output_dtype: str = "float32",
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 120.0,
) -> dict:
    """POST /clip/encode_text; returns ``text_embedding``, ``shape``, ``dtype``."""
    return post_arguments(FAMILY, "encode_text", locals())


def compute_clip_similarity(
    image: Any = None,
    text: str = "",
    model_name: str | None = None,
    model_pretrained: str | None = None,
    softmax: float = 1.0,
    ret_pca: bool = False,
    ret_patches: bool = True,
    load_size: int | None = 1024,
    center_crop: bool = False,
    interpolation_mode: str = "bilinear",
    padding_mode: str = "constant",
    similarity: str = "dot",
    negatives: list[str] | None = None,
    relevancy_temperature: float = 10.0,
    output_dtype: str = "float32",
    response_format: str = "json",
    pca_niter: int = 5,
    pca_q_min: float = 0.01,
    pca_q_max: float = 0.99,
    tensor_format: str = "HWC",
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """POST /clip/similarity; returns ``similarity_map``, ``shape``, ``dtype``."""
    return post_arguments(FAMILY, "similarity", locals())


def embed_clip(
    images: list[Any] | None = None,
    texts: list[str] | None = None,
    model_name: str | None = None,
    model_pretrained: str | None = None,
    output_dtype: str = "float32",
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> tuple[np.ndarray, np.ndarray]:
    """POST /clip/embed: (image embeddings (N, D), text embeddings (M, D)), L2-normalised, in
    one space (cosine = dot product). ``images``: file paths, bytes, PIL images or uint8 arrays;
    at most the server's ``limits.max_embed_inputs`` images and texts together."""
    images = [encode_image(image) for image in images or []]
    texts = list(texts or [])
    r = post_arguments(FAMILY, "embed", locals())
    return (
        decode_array(r["image_embeddings"], r["image_shape"], r["dtype"]),
        decode_array(r["text_embeddings"], r["text_shape"], r["dtype"]),
    )


def classify_clip(
    image: Any,
    labels: list[str],
    templates: list[str] | None = None,
    model_name: str | None = None,
    model_pretrained: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
) -> np.ndarray:
    """POST /clip/classify: the labels' probabilities (L,), in their order (``image`` may be a
    file path). ``templates`` with ``{}`` for the label; None uses the server's default set."""
    image, labels = image_arg(image), list(labels)
    r = post_arguments(FAMILY, "classify", locals())
    return np.asarray(r["probabilities"], dtype=np.float32)


def decode_features(features_b64: str, shape: list[int], dtype: str = "float32") -> np.ndarray:
    return decode_array(features_b64, shape, dtype)


def decode_text_embedding(embedding_b64: str, shape: list[int], dtype: str = "float32") -> np.ndarray:
    return decode_array(embedding_b64, shape, dtype)


def decode_similarity_map(map_b64: str, shape: list[int], dtype: str = "float32") -> np.ndarray:
    return decode_array(map_b64, shape, dtype)


def extract_clip_features_decoded(image: Any, response_format: str = "npy", **kwargs) -> np.ndarray:
    """Like :func:`extract_clip_features` (``image`` may be a path) but returns the array; it
    travels as .npy unless ``response_format="json"``."""
    r = extract_clip_features(image_arg(image), response_format=response_format, **kwargs)
    return r["array"] if "array" in r else decode_features(r["features"], r["shape"], r["dtype"])


def encode_clip_text_decoded(text: str, **kwargs) -> np.ndarray:
    r = encode_clip_text(text, **kwargs)
    return decode_text_embedding(r["text_embedding"], r["shape"], r["dtype"])


def compute_clip_similarity_decoded(
    image: Any, text: str, response_format: str = "npy", **kwargs
) -> np.ndarray:
    """Like :func:`compute_clip_similarity` but returns the map (sent as .npy by default)."""
    r = compute_clip_similarity(image_arg(image), text=text, response_format=response_format, **kwargs)
    if "array" in r:
        return r["array"]
    return decode_similarity_map(r["similarity_map"], r["shape"], r["dtype"])


# ----------------------------------------------------------------------------- folder command


def embed_folder(argv: list[str] | None = None) -> int:
    """``embed DIR --out emb.npy [--text "..."]``: every image's CLIP embedding (L2-normalised),
    one row each, the file list in row order beside it; ``--text`` ranks the folder by a text."""
    from .folders import add_embed_arguments, embed_command

    parser = argparse.ArgumentParser(
        prog="python -m clients.clip_client embed", description=embed_folder.__doc__.split(":", 1)[1]
    )
    add_embed_arguments(parser, text=True)
    parser.add_argument("--model-name", default=None, help="default: the server's default CLIP model")
    parser.add_argument("--model-pretrained", default=None)
    args = parser.parse_args(argv)
    kw = {"model_name": args.model_name, "model_pretrained": args.model_pretrained}
    kw.update(base_url=args.base_url, api_key=args.api_key)

    def embed_one(file: Path) -> np.ndarray:
        return embed_clip([file], **kw)[0][0]

    def embed_text(text: str) -> np.ndarray:
        return embed_clip(texts=[text], **kw)[1][0]

    return embed_command(args, embed_one, embed_text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "embed":
        print("usage: python -m clients.clip_client embed DIR --out emb.npy", file=sys.stderr)
        return 2
    return embed_folder(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
