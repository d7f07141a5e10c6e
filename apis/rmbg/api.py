"""Background removal route: ``/rmbg/remove`` (seed 000's RMBG servers: ``{image}`` -> ``{image}``).
The maths lives in :mod:`apis.rmbg.model`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pybase64
from PIL import Image

from apis.core.encodings import check_answer_bytes, human_bytes
from apis.core.errors import APIError
from apis.core.lazy import lazy_module
from apis.core.settings import ModelEntry
from apis.family import FamilyAPI, Job, Route
from apis.rmbg.schemas import RmbgModelSelector, RmbgRemoveRequest, RmbgRemoveResponse

rmbg_model = lazy_module("apis.rmbg.model")  # the library loads in the worker (apis/core/lazy.py)

WEBP_MAX_SIDE = 16383  # the WebP format's limit on width and height


@dataclass
class RemoveInput:
    image: Image.Image
    x: np.ndarray  # (3, S, S) model input


class Remove(Route):
    """Every image is resized to the model's input size, so a whole batch runs as one session
    call (one per image when the ONNX batch axis is fixed)."""

    name = "remove"
    request = RmbgRemoveRequest
    response = RmbgRemoveResponse
    summary = "Background removal: RGBA cut-out and/or alpha matte (BRIA RMBG / BiRefNet ONNX)."

    def check_image(self, request: RmbgRemoveRequest, size: tuple[int, int]) -> None:
        if request.output_format == "webp" and max(size) > WEBP_MAX_SIDE:
            raise APIError(
                400,
                f"output_format=webp cannot hold a {size[0]}x{size[1]} image (WebP allows at most "
                f"{WEBP_MAX_SIDE} px per side); ask for output_format=png or send a smaller image",
                param="output_format",
            )

    def decode(self, model: rmbg_model.RmbgModel, job: Job) -> RemoveInput:
        return RemoveInput(job.image, rmbg_model.preprocess(job.image, model.size, model.processing))

    def predict(self, model: rmbg_model.RmbgModel, items: list[RemoveInput]) -> list[np.ndarray]:
        """Each image's alpha matte at its own size, from one session call."""
        return [
            rmbg_model.alpha_matte(raw, *item.image.size, model.processing)
            for raw, item in zip(model.run(np.stack([i.x for i in items])), items, strict=True)
        ]

    def encode(self, job: Job, item: RemoveInput, matte: np.ndarray) -> dict:
        r: RmbgRemoveRequest = job.request
        width, height = item.image.size
        alpha = rmbg_model.alpha_channel(matte, r.threshold)
        out: dict[str, Any] = {"format": r.output_format, "width": width, "height": height}
        if r.output in ("rgba", "both"):
            rgba = rmbg_model.encode_image(rmbg_model.cutout(item.image, alpha), r.output_format)
            out["image"] = pybase64.b64encode_as_string(rgba)
        if r.output in ("mask", "both"):
            matte = rmbg_model.encode_image(Image.fromarray(alpha), r.output_format)
            out["mask"] = pybase64.b64encode_as_string(matte)
        size = sum(len(out.get(k) or "") for k in ("image", "mask"))
        check_answer_bytes(
            size,
            f"the {r.output} answer for a {width}x{height} image is {human_bytes(size)}",
            self.api.cfg.limits.max_response_bytes,
            "send a smaller image or ask for output=mask / output_format=webp",
        )
        out["model"] = job.model_id
        return out


class RmbgAPI(FamilyAPI):
    family = "rmbg"
    selector = RmbgModelSelector
    routes = (Remove,)

    def load_model(self, entry: ModelEntry) -> rmbg_model.RmbgModel:
        return rmbg_model.load_rmbg(entry, str(self.torch_device))

    def extra_stats(self) -> dict[str, Any]:
        return {
            "onnx": {
                k: {"providers": m.providers, "input_size": m.size, "dynamic_batch": m.dynamic_batch}
                for k, m in self._models.items()
            }
        }
