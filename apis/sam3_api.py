"""SAM 3 route: ``/sam3/predict`` (seed 000 fields). Schemas and the thin LitAPI; the maths lives in
:mod:`apis.sam3_model`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from .config import ModelEntry
from .errors import APIError
from .family import FamilyAPI, Job, Route
from .image_ids import CachedImageInput, EmbedResponse, not_cached
from .images import ImageInput
from .sam3_model import Encoded, Filters, Sam3Runner, load_sam3, mask_bytes, predict
from .schemas import StrictRequest, is_blank

MAX_PROMPTS = 32


class Sam3PredictRequest(StrictRequest, CachedImageInput):
    prompts: list[str] = Field(
        ..., min_length=1, max_length=MAX_PROMPTS, description="Text prompts (noun phrases), one or more."
    )
    return_masks: bool = Field(False, description="Add each instance's full-size mask.")
    mask_format: Literal["rle", "png"] = Field(
        "rle", description="rle: COCO compressed RLE {size, counts} (pycocotools); png: base64 PNG, 0/255."
    )
    score_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Keep instances scoring above this; null = server default (0.5)."
    )
    epsilon_factor: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Polygon simplification: approxPolyDP epsilon = this x the contour perimeter; "
        "0 keeps every contour corner. null = server default (0.02).",
    )
    min_area: float | None = Field(
        None,
        ge=0.0,
        description="Drop instances whose polygon covers fewer pixels; 0 keeps all. "
        "null = server default (100).",
    )
    model: str | None = Field(None, description="A configured SAM 3 model; null = the server's default.")

    @field_validator("prompts")
    @classmethod
    def _prompt_text(cls, prompts: list[str]) -> list[str]:
        for i, p in enumerate(prompts):
            if is_blank(p):
                raise ValueError(
                    f"prompts[{i}] is blank (only whitespace or invisible characters): "
                    "every prompt needs some text"
                )
        return prompts


class Sam3EmbedRequest(StrictRequest, ImageInput):
    """An image to encode and keep in the worker's cache; later predict calls send its image_id."""

    model: str | None = Field(None, description="A configured SAM 3 model; null = the server's default.")


class Sam3Mask(BaseModel):
    data: str | dict[str, Any] = Field(
        ..., description='rle: {"size": [H, W], "counts": str} (pycocotools.mask.decode); png: base64 PNG.'
    )
    format: Literal["rle", "png"]
    shape: list[int] = Field(..., description="[H, W]")


class Sam3Instance(BaseModel):
    prompt: str
    score: float
    bbox: list[float] = Field(..., description="[x1, y1, x2, y2] in pixels, clipped to the image.")
    polygon: list[list[int]] = Field(..., description="[[x, y], ...] outline of the largest mask region.")
    area: int = Field(..., description="Mask pixel count (the original service reported the bbox area).")
    mask: Sam3Mask | None = None


class ImageSize(BaseModel):
    width: int
    height: int


class Sam3PredictResponse(BaseModel):
    image_size: ImageSize
    results: list[Sam3Instance] = Field(..., description="Instances of every prompt, in prompt order.")
    model: str


@dataclass
class _Prepared:
    key: str  # image_id
    image: np.ndarray | None  # None: the request sent only the image_id
    prompts: list[str]
    filters: Filters


def _pixels(job: Job) -> np.ndarray | None:
    return None if job.image is None else np.array(job.image)


class Sam3API(FamilyAPI):
    family = "sam3"
    model_fields = ("model",)
    cached_ops = frozenset({"predict", "embed"})
    routes = (
        Route(
            "predict",
            Sam3PredictRequest,
            Sam3PredictResponse,
            "SAM 3 instances (score, box, polygon, area, mask) for each text prompt.",
        ),
        Route(
            "embed",
            Sam3EmbedRequest,
            EmbedResponse,
            "Encode an image into the worker's cache; answers its image_id for predict.",
        ),
    )

    def check(self, op: str, request: BaseModel) -> None:
        if isinstance(request, Sam3PredictRequest):
            self.check_text_length([(f"prompts[{i}]", p) for i, p in enumerate(request.prompts)], "prompts")

    def load_model(self, entry: ModelEntry) -> Sam3Runner:
        return load_sam3(entry, self.torch_device, self.compute_dtype, self.fam.cache_size)

    def extra_stats(self) -> dict[str, Any]:
        return {
            "embedding_cache": {k: m.cache.stats() for k, m in self._models.items()},
            "encoded_images": {k: m.encoded_images for k, m in self._models.items()},
            "encoded_prompts": {k: m.encoded_prompts for k, m in self._models.items()},
        }

    def _prepare(self, job: Job) -> _Prepared:
        p = job.params
        given = lambda name: p[name] if p[name] is not None else getattr(self.fam, name)  # noqa: E731
        filters = Filters(
            score_threshold=given("score_threshold"),
            epsilon_factor=given("epsilon_factor"),
            min_area=given("min_area"),
            return_masks=p["return_masks"],
            mask_format=p["mask_format"],
        )
        return _Prepared(job.image_id, _pixels(job), p["prompts"], filters)

    def op_predict(self, runner: Sam3Runner, jobs: list[Job]) -> list:
        """Every new image of the batch goes through the vision backbone together (cached ones are
        skipped), then each request's prompts run on its own encoding."""
        return self.grouped(
            "predict",
            jobs,
            prepare=self._prepare,
            key=lambda _: None,
            forward=lambda items: runner.encode([i.key for i in items], [i.image for i in items]),
            finish=lambda job, item, enc: self._answer(runner, job, item, enc),
        )

    def op_embed(self, runner: Sam3Runner, jobs: list[Job]) -> list:
        return self.grouped(
            "embed",
            jobs,
            prepare=lambda job: (job.image_id, _pixels(job), job.image_id in runner.cache),
            key=lambda _: None,
            forward=lambda items: runner.encode([k for k, _, _ in items], [im for _, im, _ in items]),
            finish=lambda job, item, enc: {
                "image_id": job.image_id,
                "width": enc.width,
                "height": enc.height,
                "cached": item[2],
                "model": job.model_id,
            },
        )

    def _answer(self, runner: Sam3Runner, job: Job, item: _Prepared, enc: Encoded | None) -> dict:
        if enc is None:
            raise not_cached(job.image_id, self.family)
        results = predict(runner, enc, item.prompts, item.filters)
        size = mask_bytes(results)
        if size > self.cfg.limits.max_response_bytes:
            raise APIError(
                400,
                f"{len(results)} masks would need {size / 2**20:.0f} MiB, over this server's limit of "
                f"{self.cfg.limits.max_response_bytes / 2**20:.0f} MiB; raise score_threshold or min_area, "
                "or use return_masks=false (polygons only)",
                code="response_too_large",
            )
        return {
            "image_size": {"width": enc.width, "height": enc.height},
            "results": results,
            "model": job.model_id,
        }
