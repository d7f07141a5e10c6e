"""DINO client, seed 004 names: ``extract_dino_features``, ``decode_features`` and
``extract_dino_features_decoded``; plus ``embed_dino`` (global image embeddings).

``image`` is base64 text (as the seed sent) or anything :func:`encode_image` takes (path,
bytes, PIL image, uint8 array); ``image_url`` / ``image_path`` work when the server allows them.
``model_type`` left as None uses the server's default model.
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


# ----------------------------------------------------------------------------- folder command


def embed_folder(argv: list[str] | None = None) -> int:
    """``embed DIR --out emb.npy``: every image's DINOv2 embedding, one row each, the file list
    in row order beside it."""
    from .folders import add_embed_arguments, embed_command

    parser = argparse.ArgumentParser(
        prog="python -m clients.dino_client embed", description=embed_folder.__doc__.split(":", 1)[1]
    )
    add_embed_arguments(parser, text=False)
    parser.add_argument("--model-type", default=None, help="default: the server's default DINOv2 model")
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each row")
    args = parser.parse_args(argv)
    kw = {"model_type": args.model_type, "pooling": args.pooling, "normalize": args.normalize}
    kw.update(base_url=args.base_url, api_key=args.api_key)

    def embed_one(file: Path) -> np.ndarray:
        return embed_dino([file], **kw)[0]

    return embed_command(args, embed_one)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "embed":
        print("usage: python -m clients.dino_client embed DIR --out emb.npy", file=sys.stderr)
        return 2
    return embed_folder(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
