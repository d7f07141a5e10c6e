"""CLIP routes: ``/clip/extract``, ``/clip/encode_text``, ``/clip/similarity`` (seed 004 fields).

Schemas and the thin LitAPI; the maths lives in :mod:`apis.clip_model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from .clip_model import (
    ClipModel,
    SimilarityMode,
    dense_features,
    encode_texts,
    load_clip,
    relevancy,
    similarity,
    spatial_softmax,
)
from .config import ModelEntry
from .dense import CLIP_MEAN, CLIP_STD, Geometry, plan, preprocess, respond, upsample_grid
from .family import FamilyAPI, Job, Route
from .registry import Key, canonical
from .schemas import DenseOptions, DenseResponse, StrictRequest, is_blank
from .tensors import OutputDType, encode_array, tensor_answer


class _ClipModelFields(StrictRequest):
    model_name: str | None = Field(
        None, description="open_clip model name; null = the server's default model."
    )
    model_pretrained: str | None = Field(None, description="open_clip pretrained tag; null = the default's.")


class _ClipDense(_ClipModelFields, DenseOptions):
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


class ClipTextRequest(_ClipModelFields):
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


class ClipExtractResponse(DenseResponse):
    pass


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


def clip_key(name: str | None, pretrained: str | None) -> Key:
    """OpenAI weights are QuickGELU models, so 'X' and 'X-quickgelu' name the same 'openai' model."""
    n, p = canonical(name, pretrained)
    return (n.removesuffix("-quickgelu") if p == "openai" else n, p)


@dataclass
class _Prepared:
    x: torch.Tensor  # (1, 3, Hp, Wp) normalised, padded
    geom: Geometry


class ClipAPI(FamilyAPI):
    family = "clip"
    model_fields = ("model_name", "model_pretrained")
    model_key = staticmethod(clip_key)
    routes = (
        Route("extract", ClipExtractRequest, ClipExtractResponse, "Dense CLIP patch features (MaskCLIP)."),
        Route("encode_text", ClipTextRequest, ClipTextResponse, "L2-normalised CLIP text embedding."),
        Route(
            "similarity",
            ClipSimilarityRequest,
            ClipSimilarityResponse,
            "Per-patch image-text similarity map.",
        ),
    )

    def check(self, op: str, request: BaseModel) -> None:
        texts = [("text", getattr(request, "text", ""))]
        texts += [(f"negatives[{i}]", t) for i, t in enumerate(getattr(request, "negatives", None) or [])]
        self.check_text_length(texts, "text")

    def load_model(self, entry: ModelEntry) -> ClipModel:
        return load_clip(entry, self.torch_device, self.compute_dtype)

    # -- routes ---------------------------------------------------------------------------
    def op_encode_text(self, cm: ClipModel, jobs: list[Job]) -> list:
        """All texts of the batch in one forward pass."""

        def finish(job: Job, _, emb: torch.Tensor) -> dict:
            data, shape = encode_array(emb.numpy(), job.params["output_dtype"])
            return {
                "text_embedding": data,
                "shape": shape,
                "dtype": job.params["output_dtype"],
                "model": job.model_id,
            }

        return self.grouped(
            "encode_text",
            jobs,
            prepare=lambda job: job.params["text"],
            key=lambda _: None,
            forward=lambda texts: encode_texts(cm, texts).cpu(),
            finish=finish,
        )

    def op_extract(self, cm: ClipModel, jobs: list[Job]) -> list:
        def prepare(job: Job) -> _Prepared:
            return self._prepare(cm, job, 3 if job.params["ret_pca"] else cm.embed_dim)

        return self.grouped(
            "extract",
            jobs,
            prepare,
            key=lambda item: item.x.shape,
            forward=lambda items: self._forward(cm, items),
            finish=lambda job, item, feats: respond(feats, item.geom, job.params, job.model_id),
        )

    def op_similarity(self, cm: ClipModel, jobs: list[Job]) -> list:
        return self.grouped(
            "similarity",
            jobs,
            prepare=lambda job: self._prepare(cm, job, 1),
            key=lambda item: item.x.shape,
            forward=lambda items: self._forward(cm, items),
            finish=lambda job, item, feats: self._similarity(cm, job, item.geom, feats),
        )

    # -- steps ----------------------------------------------------------------------------
    def _prepare(self, cm: ClipModel, job: Job, channels: int) -> _Prepared:
        p = job.params
        geom = plan(job.image.size, p, cm.patch_size, cm.patch_size, channels, self.cfg.limits)
        x = preprocess(
            job.image, p["load_size"], p["center_crop"], cm.patch_size, p["padding_mode"], CLIP_MEAN, CLIP_STD
        )
        return _Prepared(x, geom)

    @staticmethod
    def _forward(cm: ClipModel, items: list[_Prepared]) -> torch.Tensor:
        return dense_features(cm, torch.cat([item.x for item in items])).cpu()

    @staticmethod
    def _similarity(cm: ClipModel, job: Job, geom: Geometry, feats: torch.Tensor) -> dict:
        p = job.params
        negatives = p["negatives"] or []
        text = encode_texts(cm, [p["text"], *negatives]).cpu()
        if negatives:
            sim = relevancy(feats, text[0], text[1:], p["relevancy_temperature"])
        else:
            sim = similarity(feats, text[0], p["similarity"])
        if not p["ret_patches"]:
            sim = upsample_grid(sim[..., None], geom, p["interpolation_mode"])[..., 0]
        if p["softmax"] > 0 and not negatives:
            sim = spatial_softmax(sim, p["softmax"])
        arr = sim.to(torch.float32).numpy()
        return tensor_answer(
            arr, "similarity_map", p["output_dtype"], p["response_format"], model=job.model_id
        )
