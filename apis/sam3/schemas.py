"""Request and answer schemas of the SAM 3 routes (seed 000's predict fields, plus embed)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from apis.http.inputs import CachedImageInput, ImageInput
from apis.http.schemas import StrictRequest, is_blank
from apis.video_sessions import MASK_FORMAT_FIELD, MaskFormat, TrackedObjectOut

MAX_PROMPTS = 32
MAX_BOXES = 32


def check_boxes(boxes: list[list[float]] | None) -> list[list[float]] | None:
    for i, box in enumerate(boxes or []):
        if len(box) != 4:
            raise ValueError(f"boxes[{i}] must be [x1, y1, x2, y2] (4 numbers), got {len(box)}")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ValueError(f"boxes[{i}] {box} is empty: it needs x1 < x2 and y1 < y2")
    return boxes


def check_box_labels(labels: list[int] | None) -> list[int] | None:
    for i, label in enumerate(labels or []):
        if label not in (0, 1):
            raise ValueError(f"box_labels[{i}] is {label}: use 1 (positive exemplar) or 0 (negative)")
    return labels


class Sam3ModelSelector(StrictRequest):
    model: str | None = Field(None, description="A configured SAM 3 model; null = the server's default.")


class Sam3PredictRequest(Sam3ModelSelector, CachedImageInput):
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
    max_instances: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many instances per prompt (or per boxes-only query), best "
        "score first, after the other filters: 1 is the one best object. null keeps all.",
    )

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

    _box_shape = field_validator("boxes")(staticmethod(check_boxes))
    _label_values = field_validator("box_labels")(staticmethod(check_box_labels))

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


class Sam3EmbedRequest(Sam3ModelSelector, ImageInput):
    """An image to encode and keep in the worker's cache; later predict calls send its image_id."""


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


# ----------------------------------------------------------------------------- video sessions


class Sam3VideoPromptRequest(StrictRequest):
    """A concept on one frame (a text, exemplar boxes, or both), or points for one instance."""

    frame_index: int = Field(ge=0, description="The frame the prompt is on (0-based).")
    text: str | None = Field(
        None,
        description="A noun phrase: find and track every instance of it. A session tracks one concept: "
        "a new text or boxes start its tracking over.",
    )
    boxes: list[list[float]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BOXES,
        description="Exemplar boxes [x1, y1, x2, y2] in pixels of the frame; without a text, one box.",
    )
    box_labels: list[int] | None = Field(
        None, description="One per box: 1 = positive exemplar, 0 = negative. Default: all 1."
    )
    points: list[tuple[float, float]] | None = Field(
        None,
        min_length=1,
        description="[[x, y], ...] in pixels, refining instance obj_id (or adding it) on a frame that "
        "already has outputs; not with text or boxes.",
    )
    point_labels: list[int] | None = Field(
        None, description="One per point: 1 = on the instance, 0 = off it."
    )
    obj_id: int | None = Field(None, ge=0, description="The instance the points refine or add.")
    mask_encoding: MaskFormat = MASK_FORMAT_FIELD

    @field_validator("text")
    @classmethod
    def _text(cls, text: str | None) -> str | None:
        if text is not None and is_blank(text):
            raise ValueError("text is blank (only whitespace or invisible characters): give a noun phrase")
        return text

    _box_shape = field_validator("boxes")(staticmethod(check_boxes))
    _label_values = field_validator("box_labels")(staticmethod(check_box_labels))

    @model_validator(mode="after")
    def _one_prompt(self) -> Sam3VideoPromptRequest:
        if self.points is not None:
            if self.text is not None or self.boxes is not None:
                raise ValueError("points refine one instance: send them without text or boxes")
            if self.obj_id is None:
                raise ValueError("points need the obj_id of the instance they refine or add")
            if self.point_labels is None or len(self.point_labels) != len(self.points):
                raise ValueError("send one point_label per point (1 on the instance, 0 off it)")
            if any(v not in (0, 1) for v in self.point_labels):
                raise ValueError("point_labels are 1 (on the instance) or 0 (off it)")
        elif self.text is None and self.boxes is None:
            raise ValueError("give a text, boxes (with box_labels) or points (with point_labels and obj_id)")
        if self.box_labels is not None and (self.boxes is None or len(self.box_labels) != len(self.boxes)):
            raise ValueError("box_labels needs boxes, one label per box")
        return self


class Sam3TrackedInstance(TrackedObjectOut):
    score: float = Field(description="sam3's detection score of the instance (the score it was found with).")
    polygon: list[list[int]] | None = Field(
        description="[[x, y], ...] outline of the mask's largest region, as /sam3/predict draws it "
        "(epsilon_factor); null when the mask is empty."
    )


class Sam3FrameObjects(BaseModel):
    """One frame's instances; /propagate streams one of these per line, then a totals line."""

    frame_index: int
    objects: list[Sam3TrackedInstance]
