"""What a family declares for each of its routes (:class:`Route`) and what travels from the HTTP
process to a worker for one request (:class:`Job`). Both processes hold these; nothing here
imports a model library, numpy or Pillow."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from apis.core.replies import Reply, Stream

if TYPE_CHECKING:
    from PIL import Image

    from apis.family import FamilyAPI


class Route:
    """One route of a family, ``POST /<family>/<name>``: its schemas, its checks in the HTTP
    process and its hooks in the worker.

    In the worker the family hands a route the requests of one batch that are for it and for one
    model: :meth:`decode_request` turns each into a model input, :meth:`predict` runs once per
    group of inputs with equal :meth:`batch_key`, and :meth:`encode_response` builds each answer.
    An APIError raised by decode_request or encode_response answers only that request.
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

    def read_inputs(self, job: Job, request: BaseModel) -> Job:
        """Inputs other than the image field, read into ``job.params`` (embed's images, SAM 2's
        validated mask_input)."""
        return job

    # -- worker process -------------------------------------------------------------------
    def decode_request(self, model: Any, job: Job) -> Any:
        """A request's model input; ``job.image`` holds its decoded image, if it sent one."""
        return job

    def batch_key(self, item: Any) -> Hashable:
        """Inputs with equal keys run through one :meth:`predict` call."""
        return None

    def predict(self, model: Any, items: list[Any]) -> Sequence[Any]:
        """One output per input."""
        raise NotImplementedError

    def encode_response(self, model: Any, job: Job, item: Any, output: Any) -> dict | Reply | Stream:
        """The answer to one request: a JSON-able dict, a :class:`~apis.core.replies.Reply`, or a
        :class:`~apis.core.replies.Stream` of parts."""
        raise NotImplementedError


@dataclass
class Job:
    """One request as it travels to a worker: validated fields, the model's id, raw image bytes,
    and on caching routes the image_id (apis/core/image_ids.py), which a request may send alone."""

    route: str
    model_id: str
    params: dict[str, Any]
    image_bytes: bytes | None = None
    image: Image.Image | None = field(default=None, repr=False)  # decoded in the worker
    request_id: str = "-"  # the worker's log lines name it (apis/http/metrics.py)
    image_id: str | None = None
