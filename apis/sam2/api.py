"""SAM 2 routes: ``/sam2/auto_mask`` and ``/sam2/prompt_mask`` (seed 004 fields).

Schemas and the thin LitAPI; the maths lives in :mod:`apis.sam2.model`.
"""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pybase64
from pydantic import BaseModel, Field, model_validator

from apis.core.errors import APIError
from apis.core.image_ids import not_cached
from apis.core.images import decode_image
from apis.core.masks import png_base64
from apis.core.settings import ModelEntry
from apis.core.tensors import base64_len, check_response_size, encode_array
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import CachedImageInput, EmbedResponse, ImageInput
from apis.http.schemas import StrictRequest
from apis.sam2.model import (
    PRESETS,
    Embedding,
    Prompt,
    Sam2Predictor,
    auto_masks,
    auto_settings,
    load_sam2,
    predict_prompt,
    variant_name,
)

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
MaskEncoding = Literal["float32", "packbits", "png"]
_MAX_POINTS = 256
MASK_INPUT_LIMIT = 1e4  # |logit|; SAM's are tens at most, and fp16 autocast overflows at 65504


class _Sam2Model(StrictRequest):
    model_cfg: str | None = Field(
        None,
        description="Selects a configured model by its config name (e.g. "
        "configs/sam2.1/sam2.1_hiera_l.yaml); never opens a file. null = the server's default model.",
    )
    checkpoint_path: str | None = Field(
        None,
        description="Selects a configured model by its checkpoint name (e.g. sam2.1_hiera_large.pt); "
        "never opens a file.",
    )


class Sam2AutoMaskRequest(_Sam2Model, CachedImageInput):
    preset: Literal["coarse", "fine_grained"] = Field(
        "fine_grained", description="Starting values for every generator field below; explicit fields win."
    )
    points_per_side: int | None = Field(None, ge=1, le=128)
    points_per_batch: int | None = Field(None, ge=1, le=1024)
    pred_iou_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_thresh: float | None = Field(None, ge=0.0, le=1.0)
    stability_score_offset: float | None = Field(None, ge=0.0)
    mask_threshold: float | None = None
    box_nms_thresh: float | None = Field(None, ge=0.0, le=1.0)
    crop_n_layers: int | None = Field(None, ge=0, le=3)
    crop_nms_thresh: float | None = Field(None, ge=0.0, le=1.0)
    crop_overlap_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int | None = Field(None, ge=1)
    point_grids: list[list[list[float]]] | None = Field(
        None, description="One list of [x, y] points in [0, 1] per crop layer; replaces points_per_side."
    )
    min_mask_region_area: float | None = Field(
        None, ge=0.0, description="Fill holes and drop islands smaller than this many pixels."
    )
    use_m2m: bool | None = None
    multimask_output: bool | None = None
    output_mode: OutputMode = Field(
        "binary_mask", description="binary_mask (see mask_encoding), uncompressed_rle or coco_rle."
    )
    mask_encoding: MaskEncoding = Field(
        "float32",
        description="binary_mask only: float32 (seed format: base64 float32 0/1, HxW), packbits "
        "(numpy.packbits of the C-order mask, 32x smaller) or png (8-bit greyscale PNG, 0/255).",
    )

    @model_validator(mode="after")
    def _grids(self):
        for grid in self.point_grids or []:
            if not grid or len(grid) > 128 * 128:
                raise ValueError("each point grid needs 1 to 16384 points")
            if any(len(p) != 2 or not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0) for p in grid):
                raise ValueError("point_grids points must be [x, y] pairs within [0, 1]")
        settings = generator_settings(self.model_dump())
        layers = settings["crop_n_layers"]
        if self.point_grids is not None and len(self.point_grids) != layers + 1:
            raise ValueError(
                f"point_grids has {len(self.point_grids)} grids; crop_n_layers={layers} needs "
                f"{layers + 1} (one per layer)"
            )
        if self.point_grids is None:
            side, factor = settings["points_per_side"], settings["crop_n_points_downscale_factor"]
            if layer_sides(side, factor, layers)[-1] < 1:
                raise ValueError(
                    f"points_per_side={side} with crop_n_points_downscale_factor={factor} leaves crop "
                    f"layer {layers} with no points (points_per_side / factor**layer must be at least 1); "
                    "lower crop_n_points_downscale_factor or crop_n_layers"
                )
        return self


class Sam2Mask(BaseModel):
    segmentation: str | dict[str, Any] = Field(
        ..., description="binary_mask: base64 text per mask_encoding; RLE modes: {size: [H, W], counts}."
    )
    segmentation_shape: list[int] | None = Field(None, description="[H, W]; binary_mask only.")
    area: int
    bbox: list[float] = Field(..., description="[x, y, w, h]")
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[float] = Field(..., description="[x, y, w, h]")


class Sam2AutoMaskResponse(BaseModel):
    masks: list[Sam2Mask]
    num_masks: int
    image_size: list[int] = Field(..., description="[H, W]")
    output_mode: OutputMode
    mask_encoding: MaskEncoding
    settings: dict[str, Any] = Field(..., description="The generator settings that ran (preset + overrides).")
    model: str


class Sam2PromptRequest(_Sam2Model, CachedImageInput):
    point_coords: list[list[float]] | None = Field(
        None,
        max_length=_MAX_POINTS,
        description="[[x, y], ...] in pixels (or [0, 1] if normalize_coords=false).",
    )
    point_labels: list[int] | None = Field(
        None, max_length=_MAX_POINTS, description="1 = foreground, 0 = background; one per point."
    )
    box: list[float] | None = Field(None, description="[x1, y1, x2, y2]")
    mask_input: str | None = Field(
        None, description="base64 float32 low-res logits from a previous answer (low_res_masks[i])."
    )
    mask_input_shape: list[int] | None = Field(None, description="[1, L, L] (L = 256 for 1024-px models).")
    multimask_output: bool = True
    return_logits: bool = False
    normalize_coords: bool = Field(
        True, description="true: coordinates are pixels of the image; false: already in [0, 1]."
    )
    mask_threshold: float = 0.0
    max_hole_area: float = Field(
        0.0, ge=0.0, description="Fill background regions up to this many low-res px."
    )
    max_sprinkle_area: float = Field(
        0.0, ge=0.0, description="Drop foreground specks up to this many low-res px."
    )
    mask_encoding: Literal["float32", "packbits"] = Field(
        "float32",
        description="masks as base64 float32 (seed format) or packbits (numpy.packbits of the C-order "
        "[C, H, W] 0/1 masks, 32x smaller); packbits needs return_logits=false.",
    )

    @model_validator(mode="after")
    def _prompts(self):
        if self.mask_encoding == "packbits" and self.return_logits:
            raise ValueError("mask_encoding=packbits carries 0/1 masks; it cannot carry return_logits=true")
        if (self.point_coords is None) != (self.point_labels is None):
            raise ValueError("point_coords and point_labels go together: send both or neither")
        if self.point_coords is not None:
            if any(len(p) != 2 for p in self.point_coords):
                raise ValueError("point_coords must be a list of [x, y] pairs")
            if len(self.point_labels) != len(self.point_coords):
                raise ValueError(
                    f"point_labels has {len(self.point_labels)} labels for {len(self.point_coords)} points"
                )
            if any(label not in (0, 1) for label in self.point_labels):
                raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
        if self.box is not None:
            if len(self.box) != 4:
                raise ValueError(f"box must be [x1, y1, x2, y2] (4 numbers), got {len(self.box)}")
            if self.box[0] > self.box[2] or self.box[1] > self.box[3]:
                raise ValueError("box must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
        if (self.mask_input is None) != (self.mask_input_shape is None):
            raise ValueError("mask_input and mask_input_shape go together: send both or neither")
        if self.mask_input is not None:
            decode_mask_input(self.mask_input, self.mask_input_shape)
        if not self.point_coords and self.box is None and self.mask_input is None:
            raise ValueError("give at least one prompt: point_coords + point_labels, box or mask_input")
        return self


class Sam2PromptResponse(BaseModel):
    masks: str = Field(
        ..., description="base64 per mask_encoding, masks_shape [C, H, W]; 0/1 unless return_logits."
    )
    mask_encoding: Literal["float32", "packbits"]
    masks_shape: list[int]
    iou_predictions: str = Field(..., description="base64 float32, iou_shape [C].")
    iou_shape: list[int]
    low_res_masks: str = Field(..., description="base64 float32 logits, low_res_shape [C, L, L].")
    low_res_shape: list[int]
    model: str


class Sam2EmbedRequest(_Sam2Model, ImageInput):
    """An image to encode and keep in the worker's cache; later requests send its image_id."""


def sam2_key(model_cfg: str | None, checkpoint_path: str | None = None) -> tuple[str]:
    """Both request fields name a variant; they must not name two different ones."""
    a, b = variant_name(model_cfg), variant_name(checkpoint_path)
    if a and b and a != b:
        raise APIError(
            400,
            f"model_cfg names {a} but checkpoint_path names {b}; send one of them, or two that agree",
            param="checkpoint_path",
            code="model_not_found",
        )
    return (a or b or "",)


def decode_mask_input(data: str, shape: list[int]) -> np.ndarray:
    """(1, L, L) float32 from base64; ValueError (a 422 in validation) on bad text, a size that
    does not fit, or values that are not finite logits within +-MASK_INPUT_LIMIT."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1) or min(shape) < 1:
        raise ValueError(f"mask_input_shape must be [1, L, L], got {shape}")
    try:
        raw = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("mask_input is not valid base64") from None
    want = math.prod(shape) * 4
    if len(raw) != want:
        raise ValueError(
            f"mask_input has {len(raw)} bytes but mask_input_shape {shape} needs {want} (float32)"
        )
    mask = np.frombuffer(raw, dtype="<f4").reshape(1, shape[-2], shape[-1]).astype(np.float32)
    if not np.isfinite(mask).all():
        raise ValueError(
            "mask_input holds NaN or infinite values; send the low_res_masks of an earlier answer"
        )
    if np.abs(mask).max() > MASK_INPUT_LIMIT:
        raise ValueError(f"mask_input values must lie within +-{MASK_INPUT_LIMIT:g} (they are mask logits)")
    return mask


def layer_sides(points_per_side: int, factor: int, layers: int) -> list[int]:
    """Points per side of each crop layer, as sam2's build_all_layer_point_grids makes them."""
    return [int(points_per_side / factor**i) for i in range(layers + 1)]


def auto_mask_points(settings: dict[str, Any]) -> int:
    """Prompt points a generator run decodes: each layer's grid on each of its 4**layer crops."""
    layers = settings["crop_n_layers"]
    if settings["point_grids"] is not None:
        sizes = [len(g) for g in settings["point_grids"]]
    else:
        sizes = [
            n * n
            for n in layer_sides(
                settings["points_per_side"], settings["crop_n_points_downscale_factor"], layers
            )
        ]
    return sum(n * 4**i for i, n in enumerate(sizes))


def encode_binary(mask: np.ndarray, encoding: MaskEncoding) -> str:
    if encoding == "float32":  # the values as they are: 0/1, or logits (return_logits)
        return encode_array(mask)[0]
    if encoding == "packbits":
        return pybase64.b64encode_as_string(np.packbits(mask.astype(bool).ravel()))
    return png_base64(mask)


def _binary_size(h: int, w: int, encoding: MaskEncoding) -> int:
    """Upper bound of one encoded mask, in base64 bytes."""
    return base64_len(
        h * w * 4 if encoding == "float32" else (h * w + 7) // 8 + (1024 if encoding == "png" else 0)
    )


def generator_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The request's preset with its explicit generator fields on top."""
    return auto_settings(params["preset"], {k: params[k] for k in PRESETS[params["preset"]]})


def check_prompt_fits(p: dict[str, Any], size: tuple[int, int], max_response_bytes: int) -> None:
    """400 for points or a box outside the (width, height) image, or masks over the answer limit.
    The HTTP process checks with the file's header; for an image_id the worker checks with the
    cached embedding's size."""
    w, h = size
    lim_x, lim_y = (w, h) if p["normalize_coords"] else (1.0, 1.0)
    unit = "pixels" if p["normalize_coords"] else "normalised [0, 1] units (normalize_coords=false)"
    where = f"the {w}x{h} image (x in 0..{lim_x}, y in 0..{lim_y}, {unit})"
    for x, y in p["point_coords"] or []:
        if not (0 <= x <= lim_x and 0 <= y <= lim_y):
            raise APIError(400, f"point [{x}, {y}] is outside {where}", param="point_coords")
    if p["box"] is not None:
        x1, y1, x2, y2 = p["box"]
        if not (x1 >= 0 and y1 >= 0 and x2 <= lim_x and y2 <= lim_y):
            raise APIError(400, f"box {p['box']} is outside {where}", param="box")
    check_response_size(
        (3 if p["multimask_output"] else 1, h, w),
        p["mask_encoding"],
        max_response_bytes,
        "use mask_encoding=packbits, multimask_output=false or a smaller image",
    )


@dataclass
class _Whole:
    """A request's image as the cache sees it: its id, and its pixels and file unless it sent only the id."""

    key: str
    image: np.ndarray | None
    file: bytes | None


def _whole(job: Job) -> _Whole:
    return _Whole(job.image_id, None if job.image is None else np.array(job.image), job.image_bytes)


@dataclass
class _AutoJob:
    whole: _Whole
    settings: dict[str, Any]
    output_mode: str


@dataclass
class _PromptJob:
    whole: _Whole
    prompt: Prompt


class Sam2API(FamilyAPI):
    family = "sam2"
    model_fields = ("model_cfg", "checkpoint_path")
    cached_ops = frozenset({"prompt_mask", "auto_mask", "embed"})  # all encode the whole image via the cache
    model_key = staticmethod(sam2_key)
    model_fill_defaults = False
    routes = (
        Route("auto_mask", Sam2AutoMaskRequest, Sam2AutoMaskResponse, "SAM 2 automatic mask generation."),
        Route(
            "prompt_mask",
            Sam2PromptRequest,
            Sam2PromptResponse,
            "SAM 2 masks from points, a box and/or a previous low-res mask.",
        ),
        Route(
            "embed",
            Sam2EmbedRequest,
            EmbedResponse,
            "Encode an image into the worker's cache; answers its image_id for prompt_mask / auto_mask.",
        ),
    )

    def check(self, op: str, request: BaseModel) -> None:
        if not isinstance(request, Sam2AutoMaskRequest):
            return
        settings = generator_settings(request.model_dump())
        points, budget = auto_mask_points(settings), self.cfg.limits.max_auto_mask_points
        if points <= budget:
            return
        if settings["point_grids"] is not None:
            hint = "send fewer points in point_grids or fewer crop layers"
        else:
            fits = [
                p
                for p in range(1, settings["points_per_side"])
                if auto_mask_points({**settings, "points_per_side": p}) <= budget
                and layer_sides(p, settings["crop_n_points_downscale_factor"], settings["crop_n_layers"])[-1]
                >= 1
            ]
            hint = (
                f"with these crop settings points_per_side={fits[-1]} fits" if fits else "lower crop_n_layers"
            ) + "; fewer crop layers or a larger crop_n_points_downscale_factor also help"
        raise APIError(
            400,
            f"this auto_mask would decode {points} prompt points over all crop layers, over this "
            f"server's limit of {budget} (limits.max_auto_mask_points); {hint}",
            param="points_per_side",
            code="over_compute_budget",
        )

    def check_image(self, op: str, request: BaseModel, size: tuple[int, int]) -> None:
        if isinstance(request, Sam2PromptRequest):
            check_prompt_fits(vars(request), size, self.cfg.limits.max_response_bytes)

    def load_model(self, entry: ModelEntry) -> Sam2Predictor:
        return load_sam2(entry, self.torch_device, self.compute_dtype, self.fam.cache_size)

    def extra_stats(self) -> dict[str, Any]:
        return {
            "embedding_cache": {k: m.cache.stats() for k, m in self._models.items()},
            "encoded_images": {k: m.encoded_images for k, m in self._models.items()},
        }

    # -- embed and prompt_mask: images encoded together (cache first) -----------------------
    def op_embed(self, pred: Sam2Predictor, jobs: list[Job]) -> list:
        return self.grouped(
            "embed",
            jobs,
            prepare=lambda job: (_whole(job), job.image_id in pred.cache),
            key=lambda _: None,
            forward=lambda items: self._embeddings(pred, [whole for whole, _ in items]),
            finish=lambda job, item, emb: {
                "image_id": job.image_id,
                "width": emb.orig_hw[1],
                "height": emb.orig_hw[0],
                "cached": item[1],
                "model": job.model_id,
            },
        )

    def op_prompt_mask(self, pred: Sam2Predictor, jobs: list[Job]) -> list:
        return self.grouped(
            "prompt_mask",
            jobs,
            prepare=lambda job: self._prompt_job(pred, job),
            key=lambda _: None,
            forward=lambda items: self._embeddings(pred, [i.whole for i in items]),
            finish=lambda job, item, emb: self._prompt_answer(pred, job, item, emb),
        )

    @staticmethod
    def _embeddings(pred: Sam2Predictor, wholes: list[_Whole]) -> list[Embedding | None]:
        return pred.embeddings([w.key for w in wholes], [w.image for w in wholes], [w.file for w in wholes])

    @staticmethod
    def _prompt_job(pred: Sam2Predictor, job: Job) -> _PromptJob:
        p = dict(job.params)
        mask = None
        if p["mask_input"] is not None:
            mask = decode_mask_input(p["mask_input"], p["mask_input_shape"])
            side = pred.low_res_size
            if mask.shape[1:] != (side, side):
                raise APIError(
                    400,
                    f"mask_input_shape {p['mask_input_shape']} does not fit {job.model_id}: it takes "
                    f"[1, {side}, {side}] (the low_res_masks of its own answers)",
                    param="mask_input_shape",
                )
        prompt = Prompt(
            point_coords=p["point_coords"],
            point_labels=p["point_labels"],
            box=p["box"],
            mask_input=mask,
            multimask_output=p["multimask_output"],
            return_logits=p["return_logits"],
            normalize_coords=p["normalize_coords"],
            mask_threshold=p["mask_threshold"],
            max_hole_area=p["max_hole_area"],
            max_sprinkle_area=p["max_sprinkle_area"],
        )
        return _PromptJob(_whole(job), prompt)

    def _prompt_answer(self, pred: Sam2Predictor, job: Job, item: _PromptJob, emb: Embedding | None) -> dict:
        if emb is None:
            raise not_cached(job.image_id, self.family)
        if item.whole.image is None:  # only the id came: check the prompt against the cached size
            check_prompt_fits(job.params, emb.orig_hw[::-1], self.cfg.limits.max_response_bytes)
        masks, iou, low = predict_prompt(pred, emb, item.prompt)
        encoding = job.params["mask_encoding"]
        out: dict[str, Any] = {}
        out["masks"], out["masks_shape"] = encode_binary(masks, encoding), list(masks.shape)
        out["iou_predictions"], out["iou_shape"] = encode_array(iou)
        out["low_res_masks"], out["low_res_shape"] = encode_array(low)
        out["mask_encoding"] = encoding
        out["model"] = job.model_id
        return out

    # -- auto_mask: one image at a time (the generator batches its own points) -------------
    def op_auto_mask(self, pred: Sam2Predictor, jobs: list[Job]) -> list:
        return self.grouped(
            "auto_mask",
            jobs,
            prepare=lambda job: _AutoJob(
                self._with_pixels(pred, _whole(job)),
                generator_settings(job.params),
                job.params["output_mode"],
            ),
            key=id,
            forward=lambda items: [
                auto_masks(pred, i.whole.key, i.whole.image, i.settings, i.output_mode, i.whole.file)
                for i in items
            ],
            finish=self._auto_answer,
        )

    def _with_pixels(self, pred: Sam2Predictor, whole: _Whole) -> _Whole:
        """The generator's crops need pixels: for an image_id, decoded from the cached file."""
        if whole.image is not None:
            return whole
        emb = pred.cache.get(whole.key)
        if emb is None or emb.file is None:
            raise not_cached(whole.key, self.family)
        return _Whole(whole.key, np.array(decode_image(emb.file, self.cfg.limits)), emb.file)

    def _auto_answer(self, job: Job, item: _AutoJob, masks: list[dict]) -> dict:
        p = job.params
        image, settings = item.whole.image, item.settings
        h, w = image.shape[:2]
        binary = p["output_mode"] == "binary_mask"
        if binary:
            total = len(masks) * _binary_size(h, w, p["mask_encoding"])
            if total > self.cfg.limits.max_response_bytes:
                raise APIError(
                    400,
                    f"{len(masks)} masks of {w}x{h} px as {p['mask_encoding']} would need about "
                    f"{total / 2**20:.0f} MiB, over this server's limit of "
                    f"{self.cfg.limits.max_response_bytes / 2**20:.0f} MiB; ask for mask_encoding=packbits "
                    "or png, or output_mode=coco_rle",
                    code="response_too_large",
                )
        out = []
        for m in masks:
            item = {
                "segmentation": encode_binary(m["segmentation"], p["mask_encoding"])
                if binary
                else m["segmentation"],
                "area": int(m["area"]),
                "bbox": [float(v) for v in m["bbox"]],
                "predicted_iou": float(m["predicted_iou"]),
                "stability_score": float(m["stability_score"]),
                "point_coords": [[float(v) for v in pt] for pt in m["point_coords"]],
                "crop_box": [float(v) for v in m["crop_box"]],
            }
            if binary:
                item["segmentation_shape"] = [h, w]
            out.append(item)
        shown = {k: v for k, v in settings.items() if k != "point_grids"}
        return {
            "masks": out,
            "num_masks": len(out),
            "image_size": [h, w],
            "output_mode": p["output_mode"],
            "mask_encoding": p["mask_encoding"],
            "settings": {**shown, "point_grids": settings["point_grids"] is not None, "preset": p["preset"]},
            "model": job.model_id,
        }
