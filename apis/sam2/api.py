"""SAM 2 routes: ``/sam2/auto_mask`` and ``/sam2/prompt_mask`` (seed 004 fields) and
``/sam2/embed``, which encode the whole image through the model's embedding cache, and the
video tracking sessions ``/sam2/video/sessions...`` (apis/video_sessions.py).

Schemas live in :mod:`apis.sam2.schemas`, the maths in :mod:`apis.sam2.model`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pybase64

from apis.core.cache import cache_stats
from apis.core.encodings import (
    base64_len,
    check_answer_bytes,
    check_response_size,
    coco_rle,
    encode_array,
    human_bytes,
    png_base64,
)
from apis.core.errors import APIError
from apis.core.images import decode_image, not_cached
from apis.core.lazy import lazy_module
from apis.core.settings import ModelEntry
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import EmbedResponse, embed_answer
from apis.sam2.options import variant_name
from apis.sam2.schemas import (
    MaskEncoding,
    Sam2AutoMaskRequest,
    Sam2AutoMaskResponse,
    Sam2EmbedRequest,
    Sam2ModelSelector,
    Sam2PromptRequest,
    Sam2PromptResponse,
    auto_mask_points,
    generator_settings,
    layer_sides,
)
from apis.video_sessions import VIDEO_ROUTES, ServesVideo

sam2_model = lazy_module("apis.sam2.model")  # the library loads in the worker (apis/core/lazy.py)
video = lazy_module("apis.sam2.video")


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


def encode_binary(mask: np.ndarray, encoding: MaskEncoding) -> str:
    if encoding == "float32":  # the values as they are: 0/1, or logits (return_logits)
        return encode_array(mask)[0]
    if encoding == "packbits":
        return pybase64.b64encode_as_string(np.packbits(mask.astype(bool, copy=False).ravel()))
    return png_base64(mask)


def _binary_size(h: int, w: int, encoding: MaskEncoding) -> int:
    """Upper bound of one encoded mask, in base64 bytes."""
    return base64_len(
        h * w * 4 if encoding == "float32" else (h * w + 7) // 8 + (1024 if encoding == "png" else 0)
    )


def check_prompt_fits(r: Sam2PromptRequest, size: tuple[int, int], max_response_bytes: int) -> None:
    """400 for points or a box outside the (width, height) image, or masks over the answer limit.
    The HTTP process checks with the file's header; for an image_id the worker checks with the
    cached embedding's size."""
    w, h = size
    lim_x, lim_y = (w, h) if r.normalize_coords else (1.0, 1.0)
    unit = "pixels" if r.normalize_coords else "normalised [0, 1] units (normalize_coords=false)"
    where = f"the {w}x{h} image (x in 0..{lim_x}, y in 0..{lim_y}, {unit})"
    for x, y in r.point_coords or []:
        if not (0 <= x <= lim_x and 0 <= y <= lim_y):
            raise APIError(400, f"point [{x}, {y}] is outside {where}", param="point_coords")
    if r.box is not None:
        x1, y1, x2, y2 = r.box
        if not (x1 >= 0 and y1 >= 0 and x2 <= lim_x and y2 <= lim_y):
            raise APIError(400, f"box {r.box} is outside {where}", param="box")
    if r.mask_encoding == "coco_rle":  # its size depends on the masks: checked once they are encoded
        return
    check_response_size(
        (1 if r.best_only or not r.multimask_output else 3, h, w),
        r.mask_encoding,
        max_response_bytes,
        "use mask_encoding=coco_rle or packbits, best_only=true or a smaller image",
    )


@dataclass
class WholeImage:
    """A request's image as the cache sees it: its id, and its pixels and file unless it sent only the id."""

    key: str
    image: np.ndarray | None
    file: bytes | None

    @classmethod
    def of(cls, job: Job) -> WholeImage:
        return cls(job.image_id, None if job.image is None else np.array(job.image), job.image_bytes)


@dataclass
class EmbedInput:
    whole: WholeImage
    cached: bool  # already in the cache before this batch


@dataclass
class PromptInput:
    whole: WholeImage
    prompt: sam2_model.Prompt
    request: Sam2PromptRequest  # for the size check of an image named by id alone


@dataclass
class PromptOutput:
    masks: np.ndarray  # (C, H, W) bool, or float32 logits (return_logits)
    iou: np.ndarray  # (C,)
    low: np.ndarray  # (C, L, L) low-res logits


@dataclass
class AutoMaskInput:
    whole: WholeImage  # always with pixels: the generator crops them
    settings: dict[str, Any]
    output_mode: str


class _EncodesImages(Route):
    """embed and prompt_mask: the batch's images encoded together, cached ones skipped; a request
    with only an image_id gets its cached embedding, or None when it is not cached."""

    caches_image = True

    def predict(
        self, model: sam2_model.Sam2Predictor, items: list[EmbedInput | PromptInput]
    ) -> list[sam2_model.Embedding | None]:
        wholes = [item.whole for item in items]
        return model.embeddings([w.key for w in wholes], [w.image for w in wholes], [w.file for w in wholes])


class Embed(_EncodesImages):
    name = "embed"
    request = Sam2EmbedRequest
    response = EmbedResponse
    summary = "Encode an image into the worker's cache; answers its image_id for prompt_mask / auto_mask."

    def decode(self, model: sam2_model.Sam2Predictor, job: Job) -> EmbedInput:
        return EmbedInput(WholeImage.of(job), job.image_id in model.cache)

    def encode(self, job: Job, item: EmbedInput, emb: sam2_model.Embedding) -> dict:
        return embed_answer(job.image_id, emb.orig_hw[::-1], item.cached, job.model_id)


class PromptMask(_EncodesImages):
    name = "prompt_mask"
    request = Sam2PromptRequest
    response = Sam2PromptResponse
    summary = "SAM 2 masks from points, a box and/or a previous low-res mask."

    def check_image(self, request: Sam2PromptRequest, size: tuple[int, int]) -> None:
        check_prompt_fits(request, size, self.api.cfg.limits.max_response_bytes)

    def read_inputs(self, request: Sam2PromptRequest) -> Sam2PromptRequest:
        """``mask_input`` travels as the values its validation decoded (``request.mask``): the
        worker does not decode the base64 text again."""
        return request.model_copy(update={"mask_input": None})

    def decode(self, model: sam2_model.Sam2Predictor, job: Job) -> PromptInput:
        r: Sam2PromptRequest = job.request
        mask = r.mask
        side = model.low_res_size
        if mask is not None and mask.shape[1:] != (side, side):
            raise APIError(
                400,
                f"mask_input_shape {r.mask_input_shape} does not fit {job.model_id}: it takes "
                f"[1, {side}, {side}] (the low_res_masks of its own answers)",
                param="mask_input_shape",
            )
        prompt = sam2_model.Prompt(
            point_coords=r.point_coords,
            point_labels=r.point_labels,
            box=r.box,
            mask_input=mask,
            multimask_output=r.multimask_output,
            return_logits=r.return_logits,
            normalize_coords=r.normalize_coords,
            mask_threshold=r.mask_threshold,
            max_hole_area=r.max_hole_area,
            max_sprinkle_area=r.max_sprinkle_area,
            best_only=r.best_only,
        )
        return PromptInput(WholeImage.of(job), prompt, r)

    def predict(
        self, model: sam2_model.Sam2Predictor, items: list[PromptInput]
    ) -> list[PromptOutput | APIError]:
        """The images encoded (cached ones skipped), then the prompts through the decoder together:
        on CPU several at once (``sam2_model.decode_prompts``)."""
        out: list[PromptOutput | APIError | None] = []
        ready: list[sam2_model.Embedding | None] = []
        for item, emb in zip(items, super().predict(model, items), strict=True):
            try:
                if emb is None:
                    raise not_cached(item.whole.key, self.api.family)
                if item.whole.image is None:  # only the id came: check the prompt against the cached size
                    check_prompt_fits(item.request, emb.orig_hw[::-1], self.api.cfg.limits.max_response_bytes)
            except APIError as e:
                out.append(e)
                ready.append(None)
                continue
            out.append(None)
            ready.append(emb)
        decoded = sam2_model.decode_prompts(model, ready, [item.prompt for item in items])
        return [
            error or PromptOutput(*sam2_model.prompt_masks(model, item.prompt, dec))
            for error, item, dec in zip(out, items, decoded, strict=True)
        ]

    def encode(self, job: Job, item: PromptInput, output: PromptOutput) -> dict:
        r: Sam2PromptRequest = job.request
        masks, iou, low = output.masks, output.iou, output.low
        encoding = r.mask_encoding
        out: dict[str, Any] = {}
        if encoding == "coco_rle":
            out["masks"] = [coco_rle(m) for m in masks]
            size = sum(len(r["counts"]) for r in out["masks"])
            check_answer_bytes(
                size,
                f"{len(masks)} masks as coco_rle would need {human_bytes(size)}",
                self.api.cfg.limits.max_response_bytes,
                "use mask_encoding=packbits (a fixed H x W / 8 bytes per mask) or best_only=true",
            )
        else:
            out["masks"] = encode_binary(masks, encoding)
        out["masks_shape"] = list(masks.shape)
        out["iou_predictions"], out["iou_shape"] = encode_array(iou)
        out["low_res_masks"], out["low_res_shape"] = (
            encode_array(low, r.low_res_dtype) if r.return_low_res_masks else (None, None)
        )
        out["low_res_dtype"] = r.low_res_dtype
        out["mask_encoding"] = encoding
        out["model"] = job.model_id
        return out


class AutoMask(Route):
    name = "auto_mask"
    request = Sam2AutoMaskRequest
    response = Sam2AutoMaskResponse
    summary = "SAM 2 automatic mask generation."
    caches_image = True

    def check(self, request: Sam2AutoMaskRequest) -> None:
        settings = generator_settings(request)
        points, budget = auto_mask_points(settings), self.api.cfg.limits.max_auto_mask_points
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

    def decode(self, model: sam2_model.Sam2Predictor, job: Job) -> AutoMaskInput:
        whole = WholeImage.of(job)
        if whole.image is None:  # only the id came: the crops need pixels, decoded from the cached file
            emb = model.cache.get(whole.key)
            if emb is None or emb.file is None:
                raise not_cached(whole.key, self.api.family)
            whole = WholeImage(whole.key, np.array(decode_image(emb.file, self.api.cfg.limits)), emb.file)
        return AutoMaskInput(whole, generator_settings(job.request), job.request.output_mode)

    def batch_key(self, item: AutoMaskInput) -> Hashable:
        return id(item)  # one image per run: the generator batches its own points

    def predict(self, model: sam2_model.Sam2Predictor, items: list[AutoMaskInput]) -> list[list[dict]]:
        return [
            sam2_model.auto_masks(model, i.whole.key, i.whole.image, i.settings, i.output_mode, i.whole.file)
            for i in items
        ]

    def encode(self, job: Job, item: AutoMaskInput, masks: list[dict]) -> dict:
        r: Sam2AutoMaskRequest = job.request
        settings = item.settings
        h, w = item.whole.image.shape[:2]
        binary = r.output_mode == "binary_mask"
        if binary:
            encoding, total = r.mask_encoding, len(masks) * _binary_size(h, w, r.mask_encoding)
            check_answer_bytes(
                total,
                f"{len(masks)} masks of {w}x{h} px as {encoding} would need about {human_bytes(total)}",
                self.api.cfg.limits.max_response_bytes,
                "ask for mask_encoding=packbits or png, or output_mode=coco_rle",
            )
        out = []
        for m in masks:
            mask = {
                "segmentation": encode_binary(m["segmentation"], r.mask_encoding)
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
                mask["segmentation_shape"] = [h, w]
            out.append(mask)
        shown = {k: v for k, v in settings.items() if k != "point_grids"}
        return {
            "masks": out,
            "num_masks": len(out),
            "image_size": [h, w],
            "output_mode": r.output_mode,
            "mask_encoding": r.mask_encoding,
            "settings": {**shown, "point_grids": settings["point_grids"] is not None, "preset": r.preset},
            "model": job.model_id,
        }


class Sam2API(ServesVideo, FamilyAPI):
    family = "sam2"
    selector = Sam2ModelSelector
    model_key = staticmethod(sam2_key)
    model_fill_defaults = False
    routes = (AutoMask, PromptMask, Embed, *VIDEO_ROUTES)
    reuses_freed_memory = True  # /sam2/prompt_mask 1.02x and 1.14x (docs/benchmarks.md, Allocator)

    def load_model(self, entry: ModelEntry) -> sam2_model.Sam2Predictor:
        return sam2_model.load_sam2(
            entry,
            self.torch_device,
            self.compute_dtype,
            self.fam.cache_size,
            self.fam.prompt_threads,
            self.fam.parallel_prompts,
            self.fam.trace_decoder,
        )

    def open_video(
        self, model: sam2_model.Sam2Predictor, frames: list[np.ndarray] | None, **offload: bool
    ) -> Any:
        """A tracking session on the worker's one SAM 2 model (apis/sam2/video.py)."""
        return video.VideoSession.open(model.model, frames, dtype=model.dtype, **offload)

    def extra_stats(self) -> dict[str, Any]:
        return {**cache_stats(self._models), **super().extra_stats()}
