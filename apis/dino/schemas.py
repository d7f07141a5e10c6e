"""Request and answer schemas of the DINO routes (seed 004's extract fields, plus embed)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from apis.core.encodings import OutputDType
from apis.dino.options import Facet, Pooling
from apis.http.schemas import DenseOptions, DenseResponse, StrictRequest


class DinoModelSelector(StrictRequest):
    model_type: str | None = Field(
        None,
        description="torch.hub name (dinov2_vits14, _vitb14, _vitl14, _vitg14, each also _reg) among the "
        "server's models; null = the server's default model.",
    )


class DinoExtractRequest(DinoModelSelector, DenseOptions):
    stride: int | None = Field(
        None, gt=0, description="Patch-embedding stride; must divide the patch size (14). null = 14."
    )
    load_size: int | None = Field(
        -1,
        description=">0: shorter side resized to this; <0: shorter side times |load_size|; null: no resize.",
    )
    facet: Facet = Field(
        "token",
        description="token: block output (before the final norm); key/query/value: its qkv projection.",
    )
    layer: int = Field(-1, description="Block index; negative counts from the last block.")
    bin: bool = Field(False, description="Log-binned descriptors (hierarchy 2): 17 x D channels.")


class DinoEmbedRequest(DinoModelSelector):
    images: list[str] = Field(
        ..., description="Base64 image files (optionally data: URIs), embedded in order."
    )
    pooling: Pooling = Field(
        "cls",
        description="cls: the class token (timm's pre-logits output); mean: the mean of the patch tokens.",
    )
    normalize: bool = Field(False, description="L2-normalise each embedding.")
    output_dtype: OutputDType = "float32"


class DinoExtractResponse(DenseResponse):
    pass


class DinoEmbedResponse(BaseModel):
    embeddings: str = Field(..., description="base64 of little-endian (N, D) values in `dtype`.")
    shape: list[int]
    dtype: OutputDType
    pooling: Pooling
    normalized: bool
    model: str
