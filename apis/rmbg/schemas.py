"""Request and answer schemas of ``/rmbg/remove`` (seed 000's ``{image}`` -> ``{image}``, plus options)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from apis.http.inputs import ImageInput
from apis.http.schemas import StrictRequest


class RmbgModelSelector(StrictRequest):
    model: str | None = Field(None, description="A configured RMBG model; null = the server's default.")


class _RemoveOptions(BaseModel):
    """The options of /rmbg/remove; a base of their own so that ``model`` stays the last field."""

    output: Literal["rgba", "mask", "both"] = Field(
        "rgba", description="rgba: the cut-out in `image` (seed format); mask: the matte in `mask`; both."
    )
    output_format: Literal["png", "webp"] = Field("png", description="png, or lossless webp (smaller).")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="null: soft alpha (0-255); a number: 255 above it, else 0."
    )


class RmbgRemoveRequest(RmbgModelSelector, _RemoveOptions, ImageInput):
    pass


class RmbgRemoveResponse(BaseModel):
    image: str | None = Field(None, description="base64 RGBA image: the input's RGB, the matte as alpha.")
    mask: str | None = Field(None, description="base64 8-bit greyscale matte (255 = foreground).")
    format: Literal["png", "webp"]
    width: int
    height: int
    model: str
