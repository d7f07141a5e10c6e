"""CLIP routes: ``/clip/extract``, ``/clip/encode_text``, ``/clip/similarity`` (seed 004 fields).

Schemas and the thin LitAPI; the maths lives in :mod:`apis.clip_model`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .clip_model import (
    ClipModel,
    SimilarityMode,
    dense_features,
    encode_texts,
    load_clip,
    preprocess,
    relevancy,
    similarity,
    spatial_softmax,
)
from .config import ModelEntry
from .dense import InterpolationMode, PaddingMode, TensorFormat, padded_size, pca_rgb, resized_size, to_layout
from .dense import upsample_unpad as upsample
from .errors import APIError
from .family import FamilyAPI, Job, Route, per_item
from .images import ImageInput
from .registry import Key, canonical
from .tensors import OutputDType, check_response_size, encode_array


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model_name: str | None = Field(
        None, description="open_clip model name; null = the server's default model."
    )
    model_pretrained: str | None = Field(None, description="open_clip pretrained tag; null = the default's.")


class _DenseOptions(_Request, ImageInput):
    load_size: int | None = Field(
        1024,
        description=">0: shorter side resized to this; <0: shorter side times |load_size|; null: no resize.",
    )
    center_crop: bool = Field(False, description="Crop a centred square of the shorter side after resizing.")
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

    @model_validator(mode="after")
    def _consistent(self):
        if self.load_size == 0:
            raise ValueError("load_size must not be 0 (use null for no resize)")
        if self.load_size is not None and self.load_size < -8:
            raise ValueError("load_size below -8 would upscale the image more than 8x")
        if self.pca_q_min >= self.pca_q_max:
            raise ValueError("pca_q_min must be smaller than pca_q_max")
        return self


class ClipExtractRequest(_DenseOptions):
    pass


class ClipTextRequest(_Request):
    text: str = Field(..., min_length=1, description="Text to embed.")
    output_dtype: OutputDType = "float32"


class ClipSimilarityRequest(_DenseOptions):
    text: str = Field(..., min_length=1, description="Text query.")
    softmax: float = Field(
        1.0,
        description="> 0: spatial softmax of (similarity x softmax) over all positions; <= 0: raw scores.",
    )
    similarity: SimilarityMode = Field("dot", description="dot (seed: features . text) or cosine.")
    negatives: list[str] | None = Field(
        None,
        max_length=32,
        description="LERF-style negatives: returns relevancy in [0, 1] (min over negatives of the pairwise "
        "softmax of cosine x relevancy_temperature); `softmax` and `similarity` are then not used.",
    )
    relevancy_temperature: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _no_pca(self):
        if self.ret_pca:
            raise ValueError("ret_pca cannot apply to a similarity map; leave it false")
        if self.negatives is not None and not all(n.strip() for n in self.negatives):
            raise ValueError("negatives must be non-empty strings")
        return self


class ClipExtractResponse(BaseModel):
    features: str = Field(..., description="base64 of little-endian values in `dtype`, C order.")
    shape: list[int]
    dtype: OutputDType
    is_pca: bool
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


def clip_key(name: str | None, pretrained: str | None) -> Key:
    """OpenAI weights are QuickGELU models, so 'X' and 'X-quickgelu' name the same 'openai' model."""
    n, p = canonical(name, pretrained)
    return (n.removesuffix("-quickgelu") if p == "openai" else n, p)


_SHRINK_HINT = "ask for ret_patches=true, ret_pca=true, a smaller load_size or output_dtype=float16"


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
        limit = self.cfg.limits.max_text_chars
        texts = [getattr(request, "text", "")] + (getattr(request, "negatives", None) or [])
        if any(len(t) > limit for t in texts):
            raise APIError(
                400, f"text is longer than this server's limit of {limit} characters", param="text"
            )

    def load_model(self, entry: ModelEntry) -> ClipModel:
        return load_clip(entry, self.torch_device, self.compute_dtype)

    # -- routes ---------------------------------------------------------------------------
    def op_encode_text(self, cm: ClipModel, jobs: list[Job]) -> list:
        """All texts of the batch in one forward pass."""
        emb = encode_texts(cm, [j.params["text"] for j in jobs]).cpu().numpy()
        out = []
        for job, e in zip(jobs, emb, strict=True):
            data, shape = encode_array(e, job.params["output_dtype"])
            out.append(
                {
                    "text_embedding": data,
                    "shape": shape,
                    "dtype": job.params["output_dtype"],
                    "model": job.model_id,
                }
            )
        return out

    def op_extract(self, cm: ClipModel, jobs: list[Job]) -> list:
        return per_item(jobs, lambda job: self._extract(cm, job))

    def op_similarity(self, cm: ClipModel, jobs: list[Job]) -> list:
        return per_item(jobs, lambda job: self._similarity(cm, job))

    # -- per request ----------------------------------------------------------------------
    def _features(self, cm: ClipModel, job: Job, channels: int):
        """Preprocess, check the response size in advance, return (patch features, padded, resized)."""
        p = job.params
        w, h = resized_size(*job.image.size, p["load_size"])
        if p["center_crop"]:
            w = h = min(w, h)
        if w * h > self.cfg.limits.max_image_pixels:
            raise APIError(
                400,
                f"load_size={p['load_size']} would resize the image to {w}x{h}, over this server's "
                f"{self.cfg.limits.max_image_pixels / 1e6:.0f} MP limit; use a smaller load_size",
                param="load_size",
            )
        ph, pw = padded_size(h, w, cm.patch_size)
        if p["padding_mode"] in ("reflect", "circular") and (ph - h >= h or pw - w >= w):
            raise APIError(
                400,
                f"padding_mode={p['padding_mode']!r} needs an image larger than the padding "
                f"({w}x{h} px for patch {cm.patch_size}); use 'constant' or 'replicate'",
                param="padding_mode",
            )
        grid = (ph // cm.patch_size, pw // cm.patch_size)
        out_hw = grid if p["ret_patches"] else (h, w)
        shape = (*out_hw, channels) if channels > 1 else out_hw
        check_response_size(shape, p["output_dtype"], self.cfg.limits.max_response_bytes, _SHRINK_HINT)
        x, (h, w) = preprocess(job.image, p["load_size"], p["center_crop"], cm.patch_size, p["padding_mode"])
        return dense_features(cm, x)[0], (ph, pw), (h, w)

    def _extract(self, cm: ClipModel, job: Job) -> dict:
        p = job.params
        feats, padded, hw = self._features(cm, job, 3 if p["ret_pca"] else cm.embed_dim)
        if p["ret_pca"]:
            feats = pca_rgb(feats, p["pca_niter"], p["pca_q_min"], p["pca_q_max"])
        if not p["ret_patches"]:
            feats = upsample(feats, padded, hw, p["interpolation_mode"])
        data, shape = encode_array(to_layout(feats, p["tensor_format"]).numpy(), p["output_dtype"])
        return {
            "features": data,
            "shape": shape,
            "dtype": p["output_dtype"],
            "is_pca": p["ret_pca"],
            "model": job.model_id,
        }

    def _similarity(self, cm: ClipModel, job: Job) -> dict:
        p = job.params
        negatives = p["negatives"] or []
        feats, padded, hw = self._features(cm, job, 1)
        text = encode_texts(cm, [p["text"], *negatives])
        if negatives:
            sim = relevancy(feats, text[0], text[1:], p["relevancy_temperature"])
        else:
            sim = similarity(feats, text[0], p["similarity"])
        if not p["ret_patches"]:
            sim = upsample(sim[..., None], padded, hw, p["interpolation_mode"])[..., 0]
        if p["softmax"] > 0 and not negatives:
            sim = spatial_softmax(sim, p["softmax"])
        data, shape = encode_array(sim.to(torch.float32).numpy(), p["output_dtype"])
        return {"similarity_map": data, "shape": shape, "dtype": p["output_dtype"], "model": job.model_id}
