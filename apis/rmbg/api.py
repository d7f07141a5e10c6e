"""Background removal route: ``/rmbg/remove`` (seed 000's RMBG servers: ``{image}`` -> ``{image}``).
Schemas and the thin LitAPI; the maths lives in :mod:`apis.rmbg.model`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pybase64
from PIL import Image
from pydantic import BaseModel, Field

from apis.core.errors import APIError
from apis.core.settings import ModelEntry
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import ImageInput
from apis.http.schemas import StrictRequest
from apis.rmbg.model import RmbgModel, alpha_channel, alpha_matte, cutout, encode_image, load_rmbg, preprocess

WEBP_MAX_SIDE = 16383  # the WebP format's limit on width and height


class RmbgRemoveRequest(StrictRequest, ImageInput):
    output: Literal["rgba", "mask", "both"] = Field(
        "rgba", description="rgba: the cut-out in `image` (seed format); mask: the matte in `mask`; both."
    )
    output_format: Literal["png", "webp"] = Field("png", description="png, or lossless webp (smaller).")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="null: soft alpha (0-255); a number: 255 above it, else 0."
    )
    model: str | None = Field(None, description="A configured RMBG model; null = the server's default.")


class RmbgRemoveResponse(BaseModel):
    image: str | None = Field(None, description="base64 RGBA image: the input's RGB, the matte as alpha.")
    mask: str | None = Field(None, description="base64 8-bit greyscale matte (255 = foreground).")
    format: Literal["png", "webp"]
    width: int
    height: int
    model: str


@dataclass
class _Prepared:
    image: Image.Image
    x: np.ndarray  # (3, S, S) model input


class RmbgAPI(FamilyAPI):
    family = "rmbg"
    model_fields = ("model",)
    routes = (
        Route(
            "remove",
            RmbgRemoveRequest,
            RmbgRemoveResponse,
            "Background removal: RGBA cut-out and/or alpha matte (BRIA RMBG / BiRefNet ONNX).",
        ),
    )

    def check_image(self, op: str, request: BaseModel, size: tuple[int, int]) -> None:
        if request.output_format == "webp" and max(size) > WEBP_MAX_SIDE:
            raise APIError(
                400,
                f"output_format=webp cannot hold a {size[0]}x{size[1]} image (WebP allows at most "
                f"{WEBP_MAX_SIDE} px per side); ask for output_format=png or send a smaller image",
                param="output_format",
            )

    def load_model(self, entry: ModelEntry) -> RmbgModel:
        return load_rmbg(entry, str(self.torch_device))

    def extra_stats(self) -> dict[str, Any]:
        return {
            "onnx": {
                k: {"providers": m.providers, "input_size": m.size, "dynamic_batch": m.dynamic_batch}
                for k, m in self._models.items()
            }
        }

    def op_remove(self, model: RmbgModel, jobs: list[Job]) -> list:
        """Every image is resized to the model's input size, so a whole batch runs as one session
        call (one per image when the ONNX batch axis is fixed)."""
        return self.grouped(
            "remove",
            jobs,
            prepare=lambda job: _Prepared(job.image, preprocess(job.image, model.size, model.processing)),
            key=lambda _: None,
            forward=lambda items: list(model.run(np.stack([i.x for i in items]))),
            finish=lambda job, item, raw: self._answer(model, job, item, raw),
        )

    def _answer(self, model: RmbgModel, job: Job, item: _Prepared, raw: np.ndarray) -> dict:
        p = job.params
        width, height = item.image.size
        alpha = alpha_channel(alpha_matte(raw, width, height, model.processing), p["threshold"])
        out: dict[str, Any] = {"format": p["output_format"], "width": width, "height": height}
        if p["output"] in ("rgba", "both"):
            rgba = encode_image(cutout(item.image, alpha), p["output_format"])
            out["image"] = pybase64.b64encode_as_string(rgba)
        if p["output"] in ("mask", "both"):
            matte = encode_image(Image.fromarray(alpha), p["output_format"])
            out["mask"] = pybase64.b64encode_as_string(matte)
        size = sum(len(out.get(k) or "") for k in ("image", "mask"))
        if size > self.cfg.limits.max_response_bytes:
            raise APIError(
                400,
                f"the {p['output']} answer for a {width}x{height} image is {size / 2**20:.0f} MiB, over this "
                f"server's limit of {self.cfg.limits.max_response_bytes / 2**20:.0f} MiB; send a smaller "
                "image or ask for output=mask / output_format=webp",
                code="response_too_large",
            )
        out["model"] = job.model_id
        return out
