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

from pydantic import BaseModel, Field, field_validator, model_validator

from apis.core.errors import APIError
from apis.http.inputs import IMAGE_FIELDS, ImageInput

HEADER = "X-Image-Key"
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


class CachedImageInput(ImageInput):
    """An image, or the ``image_id`` of one that a ``/embed`` call (or an earlier request) cached."""

    image_id: str | None = Field(
        None,
        description="Instead of the image: the id /embed answered, i.e. the hex SHA-256 of the image "
        "file's bytes. Unknown or evicted ids get 404 image_not_cached: then send the image again.",
    )

    @field_validator("image_id")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _HEX64.fullmatch(value.lower()):
            raise ValueError(
                f"image_id must be 64 hex digits (the SHA-256 of the image file, as /embed answers it); "
                f"got {len(value)} characters{'' if len(value) > 80 else f': {value!r}'}"
            )
        return value.lower()

    @model_validator(mode="after")
    def _exactly_one_image(self):
        given = [f for f in (*IMAGE_FIELDS, "image_id") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "send exactly one of 'image' (base64), 'image_url', 'image_path' or 'image_id'"
                + (f"; got {', '.join(given)}" if given else "; got none")
            )
        return self


class EmbedResponse(BaseModel):
    image_id: str = Field(..., description="Hex SHA-256 of the image file: send it as image_id from now on.")
    width: int
    height: int
    cached: bool = Field(..., description="true: the worker had it already and the encoder did not run.")
    model: str
