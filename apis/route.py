"""What a family declares for each of its routes (:class:`Route`) and what travels from the HTTP
process to a worker for one request (:class:`Job`). Both processes hold these; nothing here
imports a model library, numpy or Pillow."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from apis.core.replies import Reply, Stream

if TYPE_CHECKING:
    from PIL import Image

    from apis.family import FamilyAPI
    from apis.vectors import OpenAIOptions


class Route:
    """One route of a family, ``POST /<family>/<name>``: its schemas, its checks in the HTTP
    process and its hooks in the worker (the only hooks: LitServe's own are not used, see
    apis/family_worker.py).

    In the worker the family hands a route the jobs of one batch that are for it and for one
    model: :meth:`decode` turns each into a model input, :meth:`predict` runs ALL the model work
    once per group of inputs with equal :meth:`batch_key`, and :meth:`encode` renders each
    answer from what predict gave (no model: it can be tested on its own). An APIError raised by
    decode or encode, or returned by predict in a request's place, answers only that request.
    """

    name: ClassVar[str]
    request: ClassVar[type[BaseModel]]
    response: ClassVar[type[BaseModel]]
    summary: ClassVar[str]
    caches_image: ClassVar[bool] = False  # the worker keeps the encoded image (image_id routes)
    reads_files: ClassVar[bool] = False  # read_inputs reads files: run it off the event loop
    endpoint: ClassVar[bool] = True  # served as POST /<family>/<name>; False: FamilyAPI.endpoints serves it
    uses_model: ClassVar[bool] = (
        True  # False: its hooks get model=None (state it reaches holds its own model)
    )

    def __init__(self, api: FamilyAPI):
        self.api = api

    # -- HTTP process ---------------------------------------------------------------------
    def check(self, request: BaseModel) -> None:
        """Checks that need the server's config (limits); raise APIError."""

    def check_image(self, request: BaseModel, size: tuple[int, int]) -> None:
        """Checks that need the image's (width, height), before it is decoded; raise APIError."""

    def read_inputs(self, request: BaseModel) -> BaseModel:
        """The request as the worker gets it: fields other than the image that the HTTP process
        reads (embed's base64 images, a session's clip) replaced by what was read, as a copy
        (``request.model_copy(update=...)``)."""
        return request

    # -- worker process -------------------------------------------------------------------
    def decode(self, model: Any, job: Job) -> Any:
        """A request's model input; ``job.image`` holds its decoded image, if it sent one."""
        return job

    def batch_key(self, item: Any) -> Hashable:
        """Inputs with equal keys run through one :meth:`predict` call."""
        return None

    def predict(self, model: Any, items: list[Any]) -> Sequence[Any]:
        """One output per input, or an APIError in its place; every model call happens here."""
        raise NotImplementedError

    def encode(self, job: Job, item: Any, output: Any) -> dict | Reply | Stream:
        """The answer to one request, rendered from ``output``: a JSON-able dict, a
        :class:`~apis.core.replies.Reply`, or a :class:`~apis.core.replies.Stream` of parts."""
        raise NotImplementedError


class AnswerFormat(Enum):
    """Whose format a job's answer takes. ``/v1/embeddings`` sends the family's own embed job, so
    that it batches with the family's other requests, but wants OpenAI's list back, rendered in
    the worker like every answer; the job names the format, and the one route that renders both
    (apis/vectors.py) tests this value, not the presence of some other field."""

    ROUTE = "route"  # the route's own JSON (its response model)
    OPENAI_EMBEDDINGS = "openai_embeddings"  # OpenAI's embeddings list (apis/openai_routes.py)


@dataclass
class Job:
    """One request as it travels to a worker: the validated request object (its image fields
    emptied, other fields the HTTP process read replaced by what it read), the model's id, the
    image's file bytes, and on caching routes the image_id (apis/core/images.py), which a
    request may send alone; a session's calls name their session. ``openai`` holds what OpenAI's
    list needs beyond the request (given exactly when ``answer_format`` is OPENAI_EMBEDDINGS)."""

    route: str
    model_id: str
    request: Any  # the route's request model (pydantic), or None for a session call with no body
    image_bytes: bytes | None = None
    image: Image.Image | None = field(default=None, repr=False)  # decoded in the worker
    request_id: str = "-"  # the worker's log lines name it (apis/http/metrics.py)
    image_id: str | None = None
    session_id: str | None = None  # video session calls (apis/video_sessions.py)
    answer_format: AnswerFormat = AnswerFormat.ROUTE
    openai: OpenAIOptions | None = None

    def __post_init__(self) -> None:
        if (self.openai is not None) != (self.answer_format is AnswerFormat.OPENAI_EMBEDDINGS):
            raise ValueError("a job carries OpenAI's options exactly when its answer is OpenAI's list")
