"""OpenAI-compatible ``POST /v1/embeddings`` and ``GET /v1/models`` over the CLIP and DINO models.

The HTTP side only validates, finds the model and reads images; the work is a ``/<family>/embed``
job (apis/vectors.py) sent to that family's workers, so it is batched with the family's other
requests and the worker renders OpenAI's answer. Errors keep OpenAI's shape (the project's
own), with two OpenAI habits: an invalid body is a 400 (not FastAPI's 422), and an unknown
model a 404 with code ``model_not_found``.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import pybase64
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, field_validator

from apis.config import ServerConfig
from apis.core.errors import APIError
from apis.core.images import probe_image
from apis.families import FAMILIES
from apis.family import FamilyAPI, Job
from apis.http.errors import ERROR_RESPONSES, validation_message
from apis.http.inputs import fetch_url
from apis.http.routing import JsonBodyRoute, error_response, reply_response
from apis.http.schemas import StrictRequest, is_blank
from apis.route import AnswerFormat
from apis.vectors import OpenAIOptions, VectorsRoute, check_count, read_image

_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URL = re.compile(r"https?://\S+", re.IGNORECASE)
# File signatures that make a bare base64 input an image (others must come as data URIs).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


class EmbeddingsRequest(StrictRequest):
    input: str | list[str] = Field(
        ...,
        description="A string or a list of strings. Texts for CLIP models; images (an extension of "
        "OpenAI's API) as data URIs ('data:image/png;base64,...') or bare base64 of a PNG, JPEG, GIF "
        "or WebP file, for CLIP and DINOv2 models.",
    )
    model: str = Field(..., description="A model id from GET /v1/models.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: base64 of little-endian float32 values."
    )
    dimensions: int | None = Field(
        None, gt=0, description="Accepted only when equal to the model's own dimension (no truncation)."
    )
    user: str | None = Field(None, description="Accepted and ignored, as an end-user id.")
    modality: Literal["text", "image"] | None = Field(
        None,
        description="What every input is (infinity's clients send it): 'text', or 'image' (data "
        "URIs, base64, or http(s) URLs when the server allows image URLs). Left out, each input "
        "is told apart by itself (URLs then count as text, except for image-only models).",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise ValueError("input must be a string or a list of strings")
        if not v:
            raise ValueError("must not be an empty list; send at least one string")
        for i, item in enumerate(v):
            if isinstance(item, (int, list)):
                raise ValueError(
                    "token arrays are not supported here: send each input as a string (a text, or an "
                    "image as a data URI or base64)"
                )
            if not isinstance(item, str):
                raise ValueError(f"item {i} is not a string")
            if is_blank(item):
                raise ValueError(f"item {i} is blank (only whitespace or invisible characters); send text")
        return v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIRoute(JsonBodyRoute):
    """JsonBodyRoute whose invalid bodies are 400s, as OpenAI answers them."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def openai_handler(request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                message, param = validation_message(e)
                return _openai_error(APIError(400, message, param=param))

        return openai_handler


def image_input(item: str, cfg: ServerConfig, param: str) -> bytes | None:
    """An input's image file bytes, or None when it is a text: a ``data:image/...;base64,`` URI,
    or bare base64 (no whitespace) whose bytes start with a PNG, JPEG, GIF or WebP signature."""
    if _DATA_URI.match(item):
        return read_image(item, cfg, param)
    if len(item) < 16 or len(item) % 4 or not _BASE64.fullmatch(item):
        return None
    head = pybase64.b64decode(item[:16])
    if head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return read_image(item, cfg, param)
    return None


class OpenAIEmbeddings:
    """The /v1 routes over the families registered with ``embeddings`` (apis/families.py)."""

    def __init__(self, cfg: ServerConfig, apis: Sequence[FamilyAPI]):
        self.cfg = cfg
        self.created = int(time.time())
        self.models: dict[str, tuple[FamilyAPI, str]] = {}
        for api in apis:
            if FAMILIES[api.family].embeddings:
                for entry in api.registry.entries:
                    model_id = api.registry.id_of(entry)
                    self.models.setdefault(_spelling(model_id), (api, model_id))

    def lookup(self, name: str) -> tuple[FamilyAPI, str]:
        found = self.models.get(_spelling(name))
        if found is None:
            offered = ", ".join(model_id for _, model_id in self.models.values())
            raise APIError(
                404,
                f"the model {name!r} does not exist on this server; it offers: {offered}",
                param="model",
                code="model_not_found",
            )
        return found

    def job(
        self, req: EmbeddingsRequest, found: tuple[FamilyAPI, str] | None = None
    ) -> tuple[FamilyAPI, Job]:
        """The ``embed`` job of a request, checked, images read (URLs fetched: blocking I/O);
        raises APIError."""
        api, model_id = found or self.lookup(req.model)
        check_count(len(req.input), self.cfg.limits, "input")
        texts_too = api.handlers["embed"].embeds_texts
        if req.modality == "text" and not texts_too:
            raise APIError(400, f"modality is 'text', but {model_id} embeds images only", param="modality")
        kinds, images, texts = [], [], []
        for i, item in enumerate(req.input):
            param = f"input[{i}]"
            url = req.modality == "image" or not texts_too
            data = self.image_of(item, param, urls=url)
            if data is not None:
                if req.modality == "text":
                    raise APIError(
                        400,
                        f"{param} is an image, but modality is 'text': send it with modality 'image', "
                        "or leave modality out to mix texts and images",
                        param=param,
                    )
                kinds.append("image")
                images.append(data)
                continue
            if req.modality == "image" or not texts_too:
                why = "modality is 'image'" if req.modality == "image" else f"{model_id} embeds images only"
                raise APIError(
                    400,
                    f"{param} is not an image, and {why}: send images as data URIs "
                    "('data:image/png;base64,...'), base64 of PNG, JPEG, GIF or WebP files, or http(s) URLs",
                    param=param,
                )
            api.check_text_length([(param, item)], param)
            kinds.append("text")
            texts.append(item)
        route: VectorsRoute = api.handlers["embed"]
        request = route.openai_request(images, texts)
        options = OpenAIOptions(tuple(kinds), req.encoding_format, req.dimensions)
        job = Job(route.name, model_id, request, answer_format=AnswerFormat.OPENAI_EMBEDDINGS, openai=options)
        return api, job

    def image_of(self, item: str, param: str, urls: bool) -> bytes | None:
        """:func:`image_input`, and with ``urls`` an http(s) URL fetched under the server's URL
        rules (``inputs.url``: off unless enabled, allow-list, public addresses only)."""
        if urls and _URL.fullmatch(item):
            try:
                data = fetch_url(item, self.cfg.inputs.url, self.cfg.limits.max_body_bytes)
                probe_image(data, self.cfg.limits)
                return data
            except APIError as e:
                raise APIError(e.status, f"{param}: {e.message}", param=param, code=e.code) from None
        return image_input(item, self.cfg, param)

    async def embeddings(self, body: EmbeddingsRequest) -> Response:
        """Embeddings of texts (CLIP) and images (CLIP, DINOv2), OpenAI's request and answer."""
        try:
            found = self.lookup(body.model)
            # base64 decoding, URL fetches and header probes, off the event loop
            ctx = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            api, job = await loop.run_in_executor(found[0].spec.reading, ctx.run, self.job, body, found)
        except APIError as e:
            return _openai_error(e)
        return reply_response(await api.spec.submit(job))

    def card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "visionserve"}

    async def list_models(self) -> JSONResponse:
        """The models /v1/embeddings takes (the configured CLIP and DINOv2 models)."""
        cards = [self.card(model_id) for _, model_id in self.models.values()]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(self, model: str) -> JSONResponse:
        """One model of GET /v1/models."""
        try:
            _, model_id = self.lookup(model)
        except APIError as e:
            return _openai_error(e)
        return JSONResponse(self.card(model_id))


def _spelling(model_id: str) -> str:
    return model_id.strip().lower().replace("_", "-")


def _openai_error(e: APIError) -> Response:
    if e.status < 500 and e.status != 401:  # OpenAI's type for every request fault
        e = APIError(e.status, e.message, param=e.param, code=e.code, type="invalid_request_error")
    return error_response(e)


def install_openai_routes(app: FastAPI, cfg: ServerConfig, apis: Sequence[FamilyAPI]) -> None:
    """Add the /v1 routes when a family that serves embeddings is enabled."""
    routes = OpenAIEmbeddings(cfg, apis)
    if not routes.models:
        return
    app.router.add_api_route(
        "/v1/embeddings",
        routes.embeddings,
        methods=["POST"],
        response_model=EmbeddingsResponse,
        responses=ERROR_RESPONSES,
        summary="OpenAI-compatible embeddings (texts; images as data URIs or base64).",
        route_class_override=OpenAIRoute,
    )
    app.router.add_api_route(
        "/v1/models",
        routes.list_models,
        methods=["GET"],
        response_model=ModelList,
        responses=ERROR_RESPONSES,
        summary="OpenAI-compatible list of the embedding models.",
    )
    app.router.add_api_route(
        "/v1/models/{model:path}",
        routes.get_model,
        methods=["GET"],
        response_model=ModelCard,
        responses=ERROR_RESPONSES,
        summary="One embedding model.",
    )
