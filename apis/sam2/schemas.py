"""Request and answer schemas of the SAM 2 routes (seed 004's fields, plus embed), with the
checks that need no server config: prompt shapes, the decoded ``mask_input`` and crop grids."""

from __future__ import annotations

import binascii
import math
from typing import Any, Literal

import numpy as np
import pybase64
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from apis.http.inputs import CachedImageInput, ImageInput
from apis.http.schemas import StrictRequest
from apis.sam2.options import PRESETS, auto_settings

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
MaskEncoding = Literal["float32", "packbits", "png"]
PromptMaskEncoding = Literal["float32", "packbits", "coco_rle"]
_MAX_POINTS = 256
MASK_INPUT_LIMIT = 1e4  # |logit|; SAM's are tens at most, and fp16 autocast overflows at 65504


class Sam2ModelSelector(StrictRequest):
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


def layer_sides(points_per_side: int, factor: int, layers: int) -> list[int]:
    """Points per side of each crop layer, as sam2's build_all_layer_point_grids makes them."""
    return [int(points_per_side / factor**i) for i in range(layers + 1)]


def generator_settings(request: Sam2AutoMaskRequest) -> dict[str, Any]:
    """The request's preset with its explicit generator fields on top."""
    return auto_settings(request.preset, {k: getattr(request, k) for k in PRESETS[request.preset]})


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


class Sam2AutoMaskRequest(Sam2ModelSelector, CachedImageInput):
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
        settings = generator_settings(self)
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


class Sam2PromptRequest(Sam2ModelSelector, CachedImageInput):
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
    mask_encoding: PromptMaskEncoding = Field(
        "float32",
        description="masks as base64 float32 (seed format), packbits (numpy.packbits of the C-order "
        "[C, H, W] 0/1 masks, 32x smaller) or coco_rle (a list of C COCO compressed RLEs "
        "{size: [H, W], counts}, as pycocotools.mask.encode writes them: the smallest for one "
        "object); packbits and coco_rle need return_logits=false.",
    )
    best_only: bool = Field(
        False,
        description="Answer only the mask with the highest predicted IoU (of the three that "
        "multimask_output=true makes), its IoU and its low-res logits: what a click tool shows.",
    )
    return_low_res_masks: bool = Field(
        True,
        description="false: low_res_masks and low_res_shape are null (for clients that send no mask_input).",
    )
    low_res_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="low_res_masks as float32 (exact) or float16 (half the bytes; logits are clamped "
        "to +-32, so float16 keeps them to about 0.02). mask_input takes float32: widen them first.",
    )

    # mask_input's float32 values as validation decoded them; bytes, so requests still compare with ==
    _mask: bytes | None = PrivateAttr(None)

    @property
    def mask(self) -> np.ndarray | None:
        """``mask_input`` as a (1, L, L) float32 array, from the values validation decoded (the
        worker takes this, so the text is decoded once); None without mask_input."""
        if self._mask is None:
            return None
        return np.frombuffer(self._mask, np.float32).reshape(1, *self.mask_input_shape[-2:]).copy()

    @model_validator(mode="after")
    def _prompts(self):
        if self.mask_encoding != "float32" and self.return_logits:
            raise ValueError(
                f"mask_encoding={self.mask_encoding} carries 0/1 masks; it cannot carry return_logits=true"
            )
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
            self._mask = decode_mask_input(self.mask_input, self.mask_input_shape).tobytes()
        if not self.point_coords and self.box is None and self.mask_input is None:
            raise ValueError("give at least one prompt: point_coords + point_labels, box or mask_input")
        return self


class CocoRle(BaseModel):
    size: list[int] = Field(..., description="[H, W]")
    counts: str = Field(
        ..., description="COCO compressed run lengths, column-major (pycocotools.mask.decode)."
    )


class Sam2PromptResponse(BaseModel):
    masks: str | list[CocoRle] = Field(
        ...,
        description="float32 / packbits: base64, masks_shape [C, H, W], 0/1 unless return_logits; "
        "coco_rle: one RLE per mask.",
    )
    mask_encoding: PromptMaskEncoding
    masks_shape: list[int]
    iou_predictions: str = Field(..., description="base64 float32, iou_shape [C].")
    iou_shape: list[int]
    low_res_masks: str | None = Field(
        ..., description="base64 logits in low_res_dtype, low_res_shape [C, L, L]; null if not asked for."
    )
    low_res_shape: list[int] | None
    low_res_dtype: Literal["float32", "float16"]
    model: str


class Sam2EmbedRequest(Sam2ModelSelector, ImageInput):
    """An image to encode and keep in the worker's cache; later requests send its image_id."""
