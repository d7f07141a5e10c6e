"""SAM 3 routes: ``/sam3/predict`` (seed 000's fields), ``/sam3/embed``, and the video tracking
sessions ``/sam3/video/sessions...`` (apis/video_sessions.py, with SAM 3's prompt: a text,
exemplar boxes or points). The maths lives in :mod:`apis.sam3.model` and :mod:`apis.sam3.video`,
the schemas in :mod:`apis.sam3.schemas`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from apis.core.cache import cache_stats
from apis.core.encodings import check_answer_bytes, human_bytes, largest_polygon
from apis.core.errors import APIError
from apis.core.images import not_cached
from apis.core.lazy import lazy_module
from apis.core.settings import ModelEntry
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import EmbedResponse, embed_answer
from apis.sam3.schemas import (
    Sam3EmbedRequest,
    Sam3FrameObjects,
    Sam3ModelSelector,
    Sam3PredictRequest,
    Sam3PredictResponse,
    Sam3VideoPromptRequest,
)
from apis.video_sessions import VIDEO_ROUTES, ServesVideo, SessionPrompts

sam3_model = lazy_module("apis.sam3.model")  # the library loads in the worker (apis/core/lazy.py)
core_video = lazy_module("apis.core.video")


@dataclass
class PromptInput:
    """A predict request in the worker: its image (or only its id) and its query."""

    image_id: str
    image: np.ndarray | None  # HWC uint8; None: the request sent only the image_id
    prompts: list[str] | None
    boxes: list[list[float]]
    labels: list[bool]
    filters: sam3_model.Filters


@dataclass
class Detected:
    """A predict request's queries on its encoded image and the detector's answer to each."""

    queries: list[sam3_model.Query]
    detections: list[sam3_model.Detections]


@dataclass
class EmbedInput:
    image_id: str
    image: np.ndarray
    cached: bool  # already in the cache before this request


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


class Predict(Route):
    name = "predict"
    request = Sam3PredictRequest
    response = Sam3PredictResponse
    summary = "SAM 3 instances (score, box, polygon, area, mask) for text prompts and/or exemplar boxes."
    caches_image = True

    def check(self, request: Sam3PredictRequest) -> None:
        prompts = enumerate(request.prompts or [])
        self.api.check_text_length([(f"prompts[{i}]", p) for i, p in prompts], "prompts")

    def check_image(self, request: Sam3PredictRequest, size: tuple[int, int]) -> None:
        _check_boxes(request.boxes or [], *size)

    def decode(self, model: sam3_model.Sam3Runner, job: Job) -> PromptInput:
        r: Sam3PredictRequest = job.request
        fam = self.api.fam
        filters = sam3_model.Filters(
            score_threshold=fam.score_threshold if r.score_threshold is None else r.score_threshold,
            epsilon_factor=fam.epsilon_factor if r.epsilon_factor is None else r.epsilon_factor,
            min_area=fam.min_area if r.min_area is None else r.min_area,
            return_masks=r.return_masks,
            mask_format=r.mask_format,
            max_instances=r.max_instances,
        )
        boxes = r.boxes or []
        labels = [bool(v) for v in r.box_labels] if r.box_labels is not None else [True] * len(boxes)
        return PromptInput(job.image_id, _pixels(job), r.prompts, boxes, labels, filters)

    def predict(self, model: sam3_model.Sam3Runner, items: list[PromptInput]) -> list[Detected | APIError]:
        """The batch's new images through the vision backbone together (cached ones are skipped),
        then every query of every request, on whichever image, through the detector together,
        ``prompt_chunk`` at a time. Per request its queries and their detections, or the
        APIError that answers it (image not cached, or boxes outside an image named by image_id, whose
        size only the cache knows)."""
        encoded = model.encode([i.image_id for i in items], [i.image for i in items])
        per_item: list[list[sam3_model.Query] | APIError] = []
        for item, enc in zip(items, encoded, strict=True):
            try:
                if enc is None:
                    raise not_cached(item.image_id, self.api.family)
                _check_boxes(item.boxes, enc.width, enc.height)
                per_item.append(
                    sam3_model.make_queries(enc, item.prompts, item.boxes, item.labels, item.filters)
                )
            except APIError as e:
                per_item.append(e)
        queries = [q for qs in per_item if not isinstance(qs, APIError) for q in qs]
        dets = iter(model.detect(queries, self.api.fam.prompt_chunk))
        return [qs if isinstance(qs, APIError) else Detected(qs, [next(dets) for _ in qs]) for qs in per_item]

    def encode(self, job: Job, item: PromptInput, output: Detected) -> dict:
        found = sam3_model.results(output.queries, output.detections, item.filters)
        size = sam3_model.mask_bytes(found)
        check_answer_bytes(
            size,
            f"{len(found)} masks would need {human_bytes(size)}",
            self.api.cfg.limits.max_response_bytes,
            "raise score_threshold or min_area, set max_instances, or use return_masks=false (polygons only)",
        )
        enc: sam3_model.Encoded = output.queries[0].enc
        return {
            "image_size": {"width": enc.width, "height": enc.height},
            "results": found,
            "model": job.model_id,
        }


class Embed(Route):
    name = "embed"
    request = Sam3EmbedRequest
    response = EmbedResponse
    summary = "Encode an image into the worker's cache; answers its image_id for predict."
    caches_image = True

    def decode(self, model: sam3_model.Sam3Runner, job: Job) -> EmbedInput:
        return EmbedInput(job.image_id, _pixels(job), job.image_id in model.cache)

    def predict(
        self, model: sam3_model.Sam3Runner, items: list[EmbedInput]
    ) -> list[sam3_model.Encoded | None]:
        return model.encode([i.image_id for i in items], [i.image for i in items])

    def encode(self, job: Job, item: EmbedInput, enc: sam3_model.Encoded) -> dict:
        return embed_answer(job.image_id, (enc.width, enc.height), item.cached, job.model_id)


class Sam3Prompts(SessionPrompts):
    """A session prompt: a concept (text and/or exemplar boxes) or points for one instance;
    frames answer every instance with its polygon, as /sam3/predict draws it."""

    request = Sam3VideoPromptRequest
    frame = Sam3FrameObjects

    def read(self, api: FamilyAPI, request: Sam3VideoPromptRequest) -> Sam3VideoPromptRequest:
        if request.text is not None:
            api.check_text_length([("text", request.text)], "text")
        return request

    def apply(self, api: FamilyAPI, session: Any, r: Sam3VideoPromptRequest) -> Any:
        return session.add_prompt(
            r.frame_index,
            text=r.text,
            boxes=r.boxes,
            box_labels=r.box_labels,
            points=r.points,
            point_labels=r.point_labels,
            obj_id=r.obj_id,
        )

    def answer(self, api: FamilyAPI, result: Any, encoding: str) -> dict[str, Any]:
        out = core_video.frame_answer(result, encoding)
        for obj, tracked in zip(out["objects"], result.objects, strict=True):
            outline = largest_polygon(tracked.mask, api.fam.epsilon_factor)
            obj["polygon"] = None if outline is None else outline[0]
        return out


class Sam3API(ServesVideo, FamilyAPI):
    family = "sam3"
    selector = Sam3ModelSelector
    routes = (Predict, Embed, *VIDEO_ROUTES)
    video_prompts = Sam3Prompts
    reuses_freed_memory = True  # /sam3/predict 1.35x and 1.28x (docs/benchmarks.md, Allocator)
    unused_modules = ()  # sam3 imports triton unguarded (sam3/model/edt.py), its kernels on CUDA

    def load_model(self, entry: ModelEntry) -> sam3_model.Sam3Runner:
        return sam3_model.load_sam3(entry, self.torch_device, self.compute_dtype, self.fam.cache_size)

    def open_video(
        self, model: sam3_model.Sam3Runner, frames: list[np.ndarray] | None, **offload: bool
    ) -> Any:
        """A tracking session on the video model that shares the worker's SAM 3 detector, made
        for the first session (apis/sam3/video.py). sam3 keeps a session's state on the model's
        device; its clip goes to CPU memory on request, and always on a CPU worker."""
        if offload["offload_state_to_cpu"]:
            raise APIError(
                400,
                "SAM 3 sessions keep their tracking state on the model's device; leave "
                "offload_state_to_cpu false (offload_video_to_cpu keeps the clip in CPU memory)",
                param="offload_state_to_cpu",
            )
        to_cpu = offload["offload_video_to_cpu"] or self.torch_device.type == "cpu"
        # made lazy only now: a lazy module in sys.modules while sam3 imports (inspect walks
        # sys.modules from torchvision's registrations) would be loaded inside sam3's own import
        video = lazy_module("apis.sam3.video")
        try:
            tracking = video.video_model(model)
        except ValueError as e:  # the model's checkpoint has no tracker that fits
            raise APIError(
                503, f"video sessions are unavailable on this model: {e}", code="no_video_model"
            ) from None
        return video.VideoSession.open(tracking, frames, offload_video_to_cpu=to_cpu)

    def extra_stats(self) -> dict[str, Any]:
        models = self._models
        return {
            **cache_stats(models),
            **super().extra_stats(),
            "encoded_prompts": {k: m.encoded_prompts for k, m in models.items()},
            "text_batch_sizes": {k: _histogram(m.text_batches) for k, m in models.items()},
            "detector_batch_sizes": {k: _histogram(m.detector_batches) for k, m in models.items()},
        }


def _histogram(counts: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counts.items())}
