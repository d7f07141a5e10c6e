"""Request and answer schemas of the CLIP routes (seed 004's fields, plus embed and classify)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from apis.clip.options import SimilarityMode
from apis.core.encodings import OutputDType
from apis.http.inputs import ImageInput
from apis.http.schemas import DenseOptions, DenseResponse, StrictRequest, is_blank


class ClipModelSelector(StrictRequest):
    model_name: str | None = Field(
        None, description="open_clip model name; null = the server's default model."
    )
    model_pretrained: str | None = Field(None, description="open_clip pretrained tag; null = the default's.")


class _ClipDense(ClipModelSelector, DenseOptions):
    load_size: int | None = Field(
        1024,
        description=">0: shorter side resized to this; <0: shorter side times |load_size|; null: no resize.",
    )
    center_crop: bool = Field(False, description="Crop a centred square of the shorter side after resizing.")


class ClipExtractRequest(_ClipDense):
    pass


def _text_shown(text: str) -> str:
    if is_blank(text):
        raise ValueError("text is blank (only whitespace or invisible characters): send some words")
    return text


#: Scales applied to similarities before a softmax: float32 logits stay finite for any |similarity| < 3e30.
MAX_SCALE = 1e8


class ClipTextRequest(ClipModelSelector):
    text: str = Field(..., min_length=1, description="Text to embed.")
    output_dtype: OutputDType = "float32"

    _shown = field_validator("text")(_text_shown)


class ClipSimilarityRequest(_ClipDense):
    text: str = Field(..., min_length=1, description="Text query.")
    softmax: float = Field(
        1.0,
        le=MAX_SCALE,
        description="> 0: spatial softmax of (similarity x softmax) over all positions; <= 0: raw scores.",
    )
    similarity: SimilarityMode = Field("dot", description="dot (seed: features . text) or cosine.")
    negatives: list[str] | None = Field(
        None,
        max_length=32,
        description="LERF-style negatives: returns relevancy in [0, 1] (min over negatives of the pairwise "
        "softmax of cosine x relevancy_temperature); `softmax` and `similarity` are then not used.",
    )
    relevancy_temperature: float = Field(10.0, gt=0, le=MAX_SCALE)

    _shown = field_validator("text")(_text_shown)

    @model_validator(mode="after")
    def _no_pca(self):
        if self.ret_pca:
            raise ValueError("ret_pca cannot apply to a similarity map; leave it false")
        if self.negatives is not None and any(is_blank(n) for n in self.negatives):
            raise ValueError("negatives must not be blank (only whitespace or invisible characters)")
        return self


class ClipEmbedRequest(ClipModelSelector):
    images: list[str] = Field(
        default_factory=list, description="Base64 image files (optionally data: URIs), embedded in order."
    )
    texts: list[str] = Field(
        default_factory=list, description="Texts, embedded in the same space as the images."
    )
    output_dtype: OutputDType = "float32"

    @model_validator(mode="after")
    def _no_blank_text(self):
        for i, text in enumerate(self.texts):
            if is_blank(text):
                raise ValueError(f"texts[{i}] is blank (only whitespace or invisible characters); send text")
        return self


class ClipClassifyRequest(ClipModelSelector, ImageInput):
    labels: list[str] = Field(..., description="Candidate labels (class names), at least one.")
    templates: list[str] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Prompt templates, each with '{}' where the label goes; the label's embedding is "
        "the normalised mean over them. null = the server's default set (README).",
    )

    @model_validator(mode="after")
    def _well_formed(self):
        for i, label in enumerate(self.labels):
            if is_blank(label):
                raise ValueError(f"labels[{i}] is blank (only whitespace or invisible characters); send text")
        for i, template in enumerate(self.templates or []):
            if "{}" not in template:
                raise ValueError(f"templates[{i}] has no '{{}}' where the label goes: {template!r}")
        return self


class ClipExtractResponse(DenseResponse):
    pass


class ClipEmbedResponse(BaseModel):
    image_embeddings: str = Field(
        ..., description="base64 of little-endian (N_images, D) values in `dtype`, L2-normalised."
    )
    image_shape: list[int]
    text_embeddings: str = Field(..., description="The same for the texts: (N_texts, D).")
    text_shape: list[int]
    dtype: OutputDType
    model: str


class ClipClassifyResponse(BaseModel):
    labels: list[str]
    probabilities: list[float] = Field(..., description="Softmax over the labels, in their order.")
    logits: list[float] = Field(..., description="Cosine x logit_scale, per label.")
    logit_scale: float
    templates: int = Field(..., description="How many templates each label was averaged over.")
    model: str


class ClipTextResponse(BaseModel):
    text_embedding: str
    shape: list[int]
    dtype: OutputDType
    model: str


class ClipSimilarityResponse(BaseModel):
    similarity_map: str
    shape: list[int]
    dtype: OutputDType
    model: str
