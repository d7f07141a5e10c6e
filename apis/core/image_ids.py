"""Embed once, prompt many: ``image_id`` names an image a SAM worker has encoded and cached.

``image_id`` is the lowercase hex SHA-256 of the image FILE's bytes as the server received them
(after base64 decoding, reading the path or fetching the URL), so a client computes it locally
without asking. The HTTP process computes it for every request that carries an image to a
caching route; it is the key of the worker's cache (apis/core/cache.py) and of the dispatcher's
affinity (apis/transport/dispatch.py), and clients send it as the ``X-Image-Key`` header, the key a load
balancer hashes on to keep an image's requests on one replica.
"""

from __future__ import annotations

import hashlib
import re

from apis.core.errors import APIError

IMAGE_ID = re.compile(r"[0-9a-f]{64}")


def content_id(data: bytes) -> str:
    """The image_id of an image file: hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def not_cached(image_id: str, family: str) -> APIError:
    return APIError(
        404,
        f"image_id {image_id} is not cached on this server (never embedded here, or evicted): send the "
        f"image itself again (image, image_url or image_path), or POST it to /{family}/embed first",
        param="image_id",
        code="image_not_cached",
    )
