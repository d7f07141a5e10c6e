"""DINO routes: ``/dino/extract`` (seed 004 fields) and ``/dino/embed``. Schemas and the thin
LitAPI; maths in :mod:`apis.dino.model`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from apis.core.dense import IMAGENET_MEAN, IMAGENET_STD, Geometry, plan, preprocess, respond
from apis.core.errors import APIError
from apis.core.settings import ModelEntry
from apis.core.tensors import OutputDType, encode_array
from apis.dino.model import (
    BIN_CELLS,
    POOLINGS,
    DinoModel,
    Facet,
    Pooling,
    dense_features,
    global_embeddings,
    load_dino,
    log_bin,
)
from apis.embed import EmbeddingRoutes, check_count, openai_answer
from apis.family import FamilyAPI, Job, Route
from apis.http.schemas import DenseOptions, DenseResponse, StrictRequest

_MODEL_TYPE = Field(
    None,
    description="torch.hub name (dinov2_vits14, _vitb14, _vitl14, _vitg14, each also _reg) among the "
    "server's models; null = the server's default model.",
)


class DinoExtractRequest(DenseOptions):
    model_type: str | None = _MODEL_TYPE
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


class DinoEmbedRequest(StrictRequest):
    model_type: str | None = _MODEL_TYPE
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


@dataclass
class _Prepared:
    x: torch.Tensor  # (1, 3, Hp, Wp) normalised, padded
    geom: Geometry
    stride: int
    layer: int  # 0..depth-1
    facet: Facet
    bin: bool

    def group(self) -> tuple:
        """Requests with equal groups run as one forward pass."""
        return (tuple(self.x.shape), self.stride, self.layer, self.facet, self.bin)


class DinoAPI(EmbeddingRoutes, FamilyAPI):
    family = "dino"
    model_fields = ("model_type",)
    routes = (
        Route(
            "extract",
            DinoExtractRequest,
            DinoExtractResponse,
            "Dense DINOv2 features: facet, layer, stride, log-binning.",
        ),
        Route(
            "embed",
            DinoEmbedRequest,
            DinoEmbedResponse,
            "Global DINOv2 image embeddings: the class token or the mean of the patch tokens.",
        ),
    )

    def check(self, op: str, request: BaseModel) -> None:
        if op == "embed":
            check_count(len(request.images), self.cfg.limits, "images", "images")

    def prepare(self, op: str, request: BaseModel) -> Job:
        job = super().prepare(op, request)
        if op == "embed":
            job.params["texts"] = []
            job = self.prepare_embed(job)
        return job

    def load_model(self, entry: ModelEntry) -> DinoModel:
        return load_dino(entry, self.torch_device, self.compute_dtype)

    def op_embed(self, dm: DinoModel, jobs: list[Job]) -> list:
        """Every image of the batch's requests in one forward, whatever pooling each asks for."""
        results = self.embed_batch(
            "embed", jobs, dm.embed_dim, dm.preprocess, lambda x: global_embeddings(dm, x)
        )
        return [
            r if isinstance(r, APIError) else self._embed_answer(dm, job, r[0])
            for job, r in zip(jobs, results, strict=True)
        ]

    @staticmethod
    def _embed_answer(dm: DinoModel, job: Job, pooled: torch.Tensor) -> dict:
        p = job.params
        emb = pooled[:, POOLINGS.index(p["pooling"])]
        if p["normalize"]:
            emb = F.normalize(emb, dim=-1)
        if p["openai"] is not None:
            return openai_answer(job, emb, emb[:0], dm.image_tokens, [])
        data, shape = encode_array(emb.numpy(), p["output_dtype"])
        return {
            "embeddings": data,
            "shape": shape,
            "dtype": p["output_dtype"],
            "pooling": p["pooling"],
            "normalized": p["normalize"],
            "model": job.model_id,
        }

    def op_extract(self, dm: DinoModel, jobs: list[Job]) -> list:
        return self.grouped(
            "extract",
            jobs,
            prepare=lambda job: self._prepare(dm, job),
            key=_Prepared.group,
            forward=lambda items: self._forward(dm, items),
            finish=lambda job, item, feats: respond(feats, item.geom, job.params, job.model_id),
        )

    def _prepare(self, dm: DinoModel, job: Job) -> _Prepared:
        p = job.params
        patch = dm.patch_size
        stride = p["stride"] or patch
        if patch % stride:
            divisors = [s for s in range(1, patch + 1) if patch % s == 0]
            raise APIError(
                400,
                f"stride {stride} does not divide the patch size {patch}; use one of {divisors} or null",
                param="stride",
            )
        if not -dm.depth <= p["layer"] < dm.depth:
            raise APIError(
                400,
                f"layer {p['layer']} is out of range: {job.model_id} has {dm.depth} blocks, so use "
                f"0..{dm.depth - 1} or -{dm.depth}..-1",
                param="layer",
            )
        channels = 3 if p["ret_pca"] else dm.embed_dim * (BIN_CELLS if p["bin"] else 1)
        geom = plan(job.image.size, p, patch, stride, channels, self.cfg.limits)
        x = preprocess(
            job.image, p["load_size"], False, patch, p["padding_mode"], IMAGENET_MEAN, IMAGENET_STD
        )
        return _Prepared(x, geom, stride, p["layer"] % dm.depth, p["facet"], p["bin"])

    @staticmethod
    def _forward(dm: DinoModel, items: list[_Prepared]) -> torch.Tensor:
        first = items[0]
        feats = dense_features(dm, torch.cat([i.x for i in items]), first.stride, first.facet, first.layer)
        return (log_bin(feats) if first.bin else feats).cpu()
