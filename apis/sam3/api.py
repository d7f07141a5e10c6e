"""SAM 3 route: ``/sam3/predict`` (seed 000 fields). Schemas and the thin LitAPI; the maths lives in
:mod:`apis.sam3.model`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from apis.core.errors import APIError
from apis.core.image_ids import not_cached
from apis.core.settings import ModelEntry
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import CachedImageInput, EmbedResponse, ImageInput
from apis.http.schemas import StrictRequest, is_blank
from apis.sam3.model import (
    Detections,
    Encoded,
    Filters,
    Query,
    Sam3Runner,
    load_sam3,
    make_queries,
    mask_bytes,
    results,
)

MAX_PROMPTS = 32
MAX_BOXES = 32


class Sam3PredictRequest(StrictRequest, CachedImageInput):
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPTS,
        description="Text prompts (noun phrases), one or more; may be left out when `boxes` are given.",
    )
    boxes: list[list[float]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BOXES,
        description="Exemplar boxes [x1, y1, x2, y2] in pixels: find the objects like (or, with label 0, "
        "unlike) them. With prompts, every prompt is combined with all the boxes; without, the boxes "
        "alone are the query (instances then have prompt null).",
    )
    box_labels: list[int] | None = Field(
        None, description="One per box: 1 = positive exemplar, 0 = negative. Default: all 1."
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
    def _prompt_text(cls, prompts: list[str] | None) -> list[str] | None:
        for i, p in enumerate(prompts or []):
            if is_blank(p):
                raise ValueError(
                    f"prompts[{i}] is blank (only whitespace or invisible characters): "
                    "every prompt needs some text"
                )
        return prompts

    @field_validator("boxes")
    @classmethod
    def _box_shape(cls, boxes: list[list[float]] | None) -> list[list[float]] | None:
        for i, box in enumerate(boxes or []):
            if len(box) != 4:
                raise ValueError(f"boxes[{i}] must be [x1, y1, x2, y2] (4 numbers), got {len(box)}")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"boxes[{i}] {box} is empty: it needs x1 < x2 and y1 < y2")
        return boxes

    @field_validator("box_labels")
    @classmethod
    def _label_values(cls, labels: list[int] | None) -> list[int] | None:
        for i, label in enumerate(labels or []):
            if label not in (0, 1):
                raise ValueError(f"box_labels[{i}] is {label}: use 1 (positive exemplar) or 0 (negative)")
        return labels

    @model_validator(mode="after")
    def _some_query(self) -> Sam3PredictRequest:
        if self.prompts is None and self.boxes is None:
            raise ValueError("give prompts, boxes, or both")
        if self.box_labels is not None:
            if self.boxes is None:
                raise ValueError("box_labels needs boxes")
            if len(self.box_labels) != len(self.boxes):
                n, m = len(self.box_labels), len(self.boxes)
                raise ValueError(f"box_labels has {n} labels for {m} boxes: give one per box")
        return self


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
    prompt: str | None = Field(
        ..., description="The text prompt of this instance; null for a boxes-only query."
    )
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
    results: list[Sam3Instance] = Field(
        ..., description="Instances of every prompt (or of the boxes-only query), in prompt order."
    )
    model: str


@dataclass
class _Prepared:
    key: str  # image_id
    image: np.ndarray | None  # None: the request sent only the image_id
    prompts: list[str] | None
    boxes: list[list[float]]
    labels: list[bool]
    filters: Filters


def _check_boxes(boxes: list[list[float]], w: int, h: int) -> None:
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if not (x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h):
            raise APIError(
                400,
                f"boxes[{i}] [{x1}, {y1}, {x2}, {y2}] is outside the {w}x{h} image "
                f"(x in 0..{w}, y in 0..{h}, pixels)",
                param="boxes",
            )


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
            "SAM 3 instances (score, box, polygon, area, mask) for text prompts and/or exemplar boxes.",
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
            prompts = enumerate(request.prompts or [])
            self.check_text_length([(f"prompts[{i}]", p) for i, p in prompts], "prompts")

    def check_image(self, op: str, request: BaseModel, size: tuple[int, int]) -> None:
        if isinstance(request, Sam3PredictRequest):
            _check_boxes(request.boxes or [], *size)

    def load_model(self, entry: ModelEntry) -> Sam3Runner:
        return load_sam3(entry, self.torch_device, self.compute_dtype, self.fam.cache_size)

    def extra_stats(self) -> dict[str, Any]:
        return {
            "embedding_cache": {k: m.cache.stats() for k, m in self._models.items()},
            "encoded_images": {k: m.encoded_images for k, m in self._models.items()},
            "encoded_prompts": {k: m.encoded_prompts for k, m in self._models.items()},
            "text_batch_sizes": {k: _histogram(m.text_batches) for k, m in self._models.items()},
            "detector_batch_sizes": {k: _histogram(m.detector_batches) for k, m in self._models.items()},
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
        boxes = p["boxes"] or []
        labels = [bool(v) for v in p["box_labels"]] if p["box_labels"] is not None else [True] * len(boxes)
        return _Prepared(job.image_id, _pixels(job), p["prompts"], boxes, labels, filters)

    def op_predict(self, runner: Sam3Runner, jobs: list[Job]) -> list:
        """The batch's new images go through the vision backbone together (cached ones are
        skipped), then the find-queries of every request, on whichever image, through the
        detector together, ``prompt_chunk`` at a time."""
        return self.grouped(
            "predict",
            jobs,
            prepare=self._prepare,
            key=lambda _: None,
            forward=lambda items: self._detect(runner, items),
            finish=lambda job, item, out: self._answer(job, item, *out),
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

    def _detect(self, runner: Sam3Runner, items: list[_Prepared]) -> list[tuple]:
        """Every query of the batch's requests through the detector together; per request its
        queries and detections, or the APIError that answers it (image not cached, or boxes
        outside an image named by image_id, whose size only the cache knows)."""
        encoded = runner.encode([i.key for i in items], [i.image for i in items])
        per_item: list[list[Query] | APIError] = []
        for item, enc in zip(items, encoded, strict=True):
            try:
                if enc is None:
                    raise not_cached(item.key, self.family)
                _check_boxes(item.boxes, enc.width, enc.height)
                per_item.append(make_queries(enc, item.prompts, item.boxes, item.labels, item.filters))
            except APIError as e:
                per_item.append(e)
        queries = [q for qs in per_item if not isinstance(qs, APIError) for q in qs]
        dets = iter(runner.detect(queries, self.fam.prompt_chunk))
        return [(qs, None) if isinstance(qs, APIError) else (qs, [next(dets) for _ in qs]) for qs in per_item]

    def _answer(
        self, job: Job, item: _Prepared, queries: list[Query] | APIError, dets: list[Detections] | None
    ) -> dict:
        if isinstance(queries, APIError):
            raise queries
        found = results(queries, dets, item.filters)
        size = mask_bytes(found)
        if size > self.cfg.limits.max_response_bytes:
            raise APIError(
                400,
                f"{len(found)} masks would need {size / 2**20:.0f} MiB, over this server's limit of "
                f"{self.cfg.limits.max_response_bytes / 2**20:.0f} MiB; raise score_threshold or min_area, "
                "or use return_masks=false (polygons only)",
                code="response_too_large",
            )
        enc: Encoded = queries[0].enc
        return {
            "image_size": {"width": enc.width, "height": enc.height},
            "results": found,
            "model": job.model_id,
        }


def _histogram(counts: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counts.items())}
