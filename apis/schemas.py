"""Request and response pieces shared by several routes (pydantic-first, as FastAPI documents them)."""

from __future__ import annotations

import unicodedata

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .dense import InterpolationMode, PaddingMode, TensorFormat
from .images import ImageInput
from .tensors import OutputDType, ResponseFormat


class StrictRequest(BaseModel):
    """Unknown fields, wrong JSON types and NaN/inf are refused (422) instead of silently coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace, control characters and invisible format
    characters (zero-width space and joiners, byte-order mark). Every text field refuses it (422)."""
    return all(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


class DenseOptions(StrictRequest, ImageInput):
    """What every dense-feature route takes (seed 004): resizing, PCA, upsampling, layout."""

    load_size: int | None = Field(
        ...,
        description=">0: shorter side resized to this; <0: shorter side times |load_size|; null: no resize.",
    )
    ret_patches: bool = Field(
        True, description="true: one vector per patch; false: upsampled to image pixels."
    )
    ret_pca: bool = Field(False, description="Return the top-3 PCA projection scaled to [0, 1].")
    pca_niter: int = Field(5, ge=1, le=100)
    pca_q_min: float = Field(0.01, ge=0.0, le=1.0)
    pca_q_max: float = Field(0.99, ge=0.0, le=1.0)
    interpolation_mode: InterpolationMode = "bilinear"
    tensor_format: TensorFormat = "HWC"
    padding_mode: PaddingMode = "constant"
    output_dtype: OutputDType = Field(
        "float32", description="Dtype of the returned values (float16 halves bytes)."
    )
    response_format: ResponseFormat = Field(
        "json",
        description="json: the tensor as base64 in a JSON body; npy: the response body IS the .npy "
        "file (application/x-npy; model and is_pca in X-Visionserve-* headers), a quarter smaller.",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.load_size == 0:
            raise ValueError("load_size must not be 0 (use null for no resize)")
        if self.load_size is not None and self.load_size < -8:
            raise ValueError("load_size below -8 would upscale the image more than 8x")
        if self.pca_q_min >= self.pca_q_max:
            raise ValueError("pca_q_min must be smaller than pca_q_max")
        return self


class DenseResponse(BaseModel):
    features: str = Field(..., description="base64 of little-endian values in `dtype`, C order.")
    shape: list[int]
    dtype: OutputDType
    is_pca: bool
    model: str
