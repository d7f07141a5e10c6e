"""CLIP routes: ``/clip/extract``, ``/clip/encode_text``, ``/clip/similarity`` (seed 004 fields),
``/clip/embed`` and ``/clip/classify``.

Schemas and the thin LitAPI; the maths lives in :mod:`apis.clip.model`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from apis.clip.model import (
    DEFAULT_TEMPLATES,
    ClipModel,
    SimilarityMode,
    class_embeddings,
    count_tokens,
    dense_features,
    encode_images,
    encode_texts,
    load_clip,
    prompts,
    relevancy,
    similarity,
    spatial_softmax,
    zero_shot_logits,
)
from apis.core.dense import CLIP_MEAN, CLIP_STD, Geometry, plan, preprocess, respond, upsample_grid
from apis.core.errors import APIError
from apis.core.registry import Key, canonical
from apis.core.settings import ModelEntry
from apis.core.tensors import OutputDType, encode_array, tensor_answer
from apis.embed import EmbeddingRoutes, check_count, openai_answer
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import ImageInput
from apis.http.schemas import DenseOptions, DenseResponse, StrictRequest, is_blank


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


class ClipEmbedRequest(_ClipModelFields):
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


class ClipClassifyRequest(_ClipModelFields, ImageInput):
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


def clip_key(name: str | None, pretrained: str | None) -> Key:
    """OpenAI weights are QuickGELU models, so 'X' and 'X-quickgelu' name the same 'openai' model."""
    n, p = canonical(name, pretrained)
    return (n.removesuffix("-quickgelu") if p == "openai" else n, p)


@dataclass
class _Prepared:
    x: torch.Tensor  # (1, 3, Hp, Wp) normalised, padded
    geom: Geometry


class ClipAPI(EmbeddingRoutes, FamilyAPI):
    family = "clip"
    model_fields = ("model_name", "model_pretrained")
    model_key = staticmethod(clip_key)
    embeds_texts = True
    routes = (
        Route("extract", ClipExtractRequest, ClipExtractResponse, "Dense CLIP patch features (MaskCLIP)."),
        Route("encode_text", ClipTextRequest, ClipTextResponse, "L2-normalised CLIP text embedding."),
        Route(
            "similarity",
            ClipSimilarityRequest,
            ClipSimilarityResponse,
            "Per-patch image-text similarity map.",
        ),
        Route(
            "embed",
            ClipEmbedRequest,
            ClipEmbedResponse,
            "L2-normalised image and text embeddings in one space (open_clip encode_image / encode_text).",
        ),
        Route(
            "classify",
            ClipClassifyRequest,
            ClipClassifyResponse,
            "Zero-shot label probabilities of one image (prompt templates, softmax at the logit scale).",
        ),
    )

    def check(self, op: str, request: BaseModel) -> None:
        texts = [("text", getattr(request, "text", ""))]
        texts += [(f"negatives[{i}]", t) for i, t in enumerate(getattr(request, "negatives", None) or [])]
        self.check_text_length(texts, "text")
        if op == "embed":
            check_count(
                len(request.images) + len(request.texts), self.cfg.limits, "images", "images and texts"
            )
            self.check_text_length([(f"texts[{i}]", t) for i, t in enumerate(request.texts)], "texts")
        elif op == "classify":
            check_count(len(request.labels), self.cfg.limits, "labels", "labels")
            self.check_text_length([(f"labels[{i}]", t) for i, t in enumerate(request.labels)], "labels")
            templates = request.templates or []
            self.check_text_length([(f"templates[{i}]", t) for i, t in enumerate(templates)], "templates")

    def prepare(self, op: str, request: BaseModel) -> Job:
        job = super().prepare(op, request)
        return self.prepare_embed(job) if op == "embed" else job

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

    def op_embed(self, cm: ClipModel, jobs: list[Job]) -> list:
        """Every image of the batch's requests in one forward, every text in another."""
        results = self.embed_batch(
            "embed",
            jobs,
            cm.embed_dim,
            cm.preprocess,
            lambda x: encode_images(cm, x),
            lambda texts: encode_texts(cm, texts),
        )
        return [
            r if isinstance(r, APIError) else self._embed_answer(cm, job, *r)
            for job, r in zip(jobs, results, strict=True)
        ]

    @staticmethod
    def _embed_answer(cm: ClipModel, job: Job, images: torch.Tensor, texts: torch.Tensor) -> dict:
        p = job.params
        if p["openai"] is not None:
            return openai_answer(job, images, texts, cm.image_tokens, count_tokens(cm, p["texts"]))
        image_data, image_shape = encode_array(images.numpy(), p["output_dtype"])
        text_data, text_shape = encode_array(texts.numpy(), p["output_dtype"])
        return {
            "image_embeddings": image_data,
            "image_shape": image_shape,
            "text_embeddings": text_data,
            "text_shape": text_shape,
            "dtype": p["output_dtype"],
            "model": job.model_id,
        }

    def op_classify(self, cm: ClipModel, jobs: list[Job]) -> list:
        """The batch's images in one forward; its distinct prompts (label x template) in chunks."""

        def prepare(job: Job) -> tuple[torch.Tensor, list[str]]:
            templates = job.params["templates"] or list(DEFAULT_TEMPLATES)
            return cm.preprocess(job.image), prompts(job.params["labels"], templates)

        def forward(items: list[tuple[torch.Tensor, list[str]]]) -> list:
            images = encode_images(cm, torch.stack([x for x, _ in items])).cpu()
            vectors = self._prompt_embeddings(cm, [t for _, ps in items for t in ps])
            return [(images[k], torch.stack([vectors[t] for t in ps])) for k, (_, ps) in enumerate(items)]

        def finish(job: Job, _, res: tuple[torch.Tensor, torch.Tensor]) -> dict:
            image, prompt_emb = res
            labels = job.params["labels"]
            logits = zero_shot_logits(cm, image, class_embeddings(prompt_emb, len(labels)))
            return {
                "labels": labels,
                "probabilities": torch.softmax(logits, dim=0).tolist(),
                "logits": logits.tolist(),
                "logit_scale": float(cm.model.logit_scale.detach().float().exp()),
                "templates": len(job.params["templates"] or DEFAULT_TEMPLATES),
                "model": job.model_id,
            }

        return self.grouped("classify", jobs, prepare, key=lambda _: None, forward=forward, finish=finish)

    def _prompt_embeddings(self, cm: ClipModel, texts: list[str]) -> dict[str, torch.Tensor]:
        """Normalised embeddings of the distinct ``texts``: cached ones reused, the others made
        in chunks and cached."""
        found: dict[str, torch.Tensor] = {}
        missing = []
        for text in dict.fromkeys(texts):
            vector = cm.prompt_cache.get(text)
            if vector is None:
                missing.append(text)
            else:
                found[text] = vector
        if missing:
            made = self._chunked(lambda chunk: encode_texts(cm, chunk), missing, None)
            for text, vector in zip(missing, made, strict=True):
                found[text] = vector.clone()  # not a view that keeps the whole chunk alive
                cm.prompt_cache.put(text, found[text])
        return found

    def extra_stats(self) -> dict:
        return {"prompt_cache": {k: m.prompt_cache.stats() for k, m in self._models.items()}}

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
