"""Video tracking sessions over HTTP, for any family with a video model (SAM 2, SAM 3):
``/<family>/video/sessions`` and its ``/prompts``, ``/propagate`` (NDJSON stream) and ``/frames``.

A session's tracking state cannot move between processes, so it lives in the worker that made it
(:class:`~apis.core.sessions.SessionStore`), and its id names that worker's connection token: the
HTTP process sends every later call of the session to that worker (a hard pin, not the image
affinity's hint), and answers 410 ``session_lost`` by itself once that worker has gone.

The family supplies the model: ``FamilyAPI.open_video(model, frames, **offload)`` returns a
session object with the methods of ``apis/sam2/video.py``'s ``VideoSession``; and its prompt,
when it is not SAM 2's (an object's points, box or mask): a :class:`SessionPrompts` gives the
request schema, how the worker applies it and each frame's answer (SAM 3: a text, exemplar boxes
or points; instances with polygons). The clip is decoded in the worker (apis/core/video.py); the
HTTP process only reads its bytes.
"""

from __future__ import annotations

import binascii
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import pybase64
from fastapi.responses import Response
from pydantic import BaseModel, Field, model_validator

from apis.core.errors import APIError
from apis.core.images import decode_image, probe_image
from apis.core.lazy import lazy_module
from apis.core.replies import Stream
from apis.core.sessions import Entry, SessionStore, lost, not_found, worker_token
from apis.family import FamilyAPI, Job, Route
from apis.http.inputs import IMAGE_FIELDS, ImageInput, read_image_bytes, read_path
from apis.http.routing import PartsResponse, reply_response
from apis.http.schemas import StrictRequest

video = lazy_module("apis.core.video")  # OpenCV, in the worker only

MaskFormat = Literal["coco_rle", "png", "polygons"]
MASK_FORMAT_FIELD = Field(
    "coco_rle",
    description="How each object's mask is sent: coco_rle ({'size': [H, W], 'counts': str}, pycocotools), "
    "png (base64 8-bit PNG, 0 or 255) or polygons (outlines as [[x, y], ...] lists).",
)


# --------------------------------------------------------------------------- schemas


class CreateSessionRequest(StrictRequest):
    """A clip (one of video, frames, video_path), or none of them for a live session."""

    video: str | None = Field(
        None, description="A video file (MP4, WebM, MOV, ...) base64-encoded; decoded with OpenCV."
    )
    frames: list[str] | None = Field(
        None, description="The clip as a list of base64 images (PNG, JPEG, ...), all of one size."
    )
    video_path: str | None = Field(
        None, description="A video file on the server, under one of inputs.path.roots."
    )
    max_frames: int | None = Field(
        None,
        ge=1,
        description="Keep at most this many frames of the clip (at most the server's video.max_frames).",
    )
    offload_video_to_cpu: bool = Field(
        False, description="Keep the clip's frames in CPU memory (GPU servers)."
    )
    offload_state_to_cpu: bool = Field(
        False, description="Keep the tracking state in CPU memory (GPU servers): less GPU memory, slower."
    )

    @model_validator(mode="after")
    def _one_source(self):
        given = [f for f in ("video", "frames", "video_path") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"send at most one of 'video', 'frames' or 'video_path'; got {', '.join(given)}")
        return self


class SessionCreated(BaseModel):
    session_id: str = Field(description="Names the session in every later call; valid on this server only.")
    num_frames: int = Field(description="Frames of the clip (0 for a live session until frames are added).")
    width: int | None = Field(description="Frame width in pixels (null for a live session without frames).")
    height: int | None = Field(description="Frame height in pixels.")
    live: bool = Field(description="True when frames are added one by one with POST .../frames.")
    model: str = Field(description="The model tracking this session.")
    expires_in: float = Field(description="Seconds the session lives without being used (video.idle_ttl_s).")


class PromptRequest(StrictRequest):
    """Points, a box and/or a mask for one object on one frame."""

    frame_index: int = Field(ge=0, description="The frame the prompt is on (0-based).")
    obj_id: int = Field(ge=0, description="Your id for the object; prompts with the same id refine it.")
    points: list[tuple[float, float]] | None = Field(
        None, description="[[x, y], ...] in pixels of the frame."
    )
    labels: list[int] | None = Field(None, description="One per point: 1 = on the object, 0 = background.")
    box: tuple[float, float, float, float] | None = Field(None, description="[x1, y1, x2, y2] in pixels.")
    mask: str | None = Field(
        None,
        description="A base64 PNG of the frame's size; non-zero pixels are the object (not with points/box).",
    )
    clear_old_points: bool = Field(True, description="Replace this object's earlier points on this frame.")
    mask_encoding: MaskFormat = MASK_FORMAT_FIELD

    @model_validator(mode="after")
    def _some_prompt(self):
        if self.points is None and self.box is None and self.mask is None:
            raise ValueError("send points (with labels), a box or a mask")
        if (self.points is None) != (self.labels is None) or (
            self.points is not None and len(self.points) != len(self.labels)
        ):
            raise ValueError("send points and labels together, one label per point")
        if self.labels is not None and any(v not in (0, 1) for v in self.labels):
            raise ValueError("labels are 1 (on the object) or 0 (background)")
        return self


class PropagateRequest(StrictRequest):
    direction: Literal["forward", "backward", "both"] = Field(
        "forward",
        description="forward: later frames; backward: earlier frames; both: backward after forward.",
    )
    start_frame_index: int | None = Field(
        None, ge=0, description="The first frame; null = the earliest prompted frame."
    )
    max_frames: int | None = Field(None, ge=1, description="Track at most this many frames (per direction).")
    mask_encoding: MaskFormat = MASK_FORMAT_FIELD


class FrameRequest(ImageInput, StrictRequest):
    """One new frame of a live session, as image, image_url or image_path."""

    mask_encoding: MaskFormat = MASK_FORMAT_FIELD


class TrackedObjectOut(BaseModel):
    obj_id: int
    score: float = Field(description="Presence: the sigmoid of the model's object score, in [0, 1].")
    area: int = Field(description="Mask pixels.")
    bbox: list[int] | None = Field(
        description="[x, y, width, height] around the mask; null when it is empty."
    )
    mask: Any = Field(description="The mask in the request's mask_encoding.")


class FrameObjects(BaseModel):
    """One frame's objects; /propagate streams one of these per line, then a totals line."""

    frame_index: int
    objects: list[TrackedObjectOut]


class SessionInfo(BaseModel):
    session_id: str
    model: str
    worker: int = Field(description="The model worker that holds the session (every call goes there).")
    num_frames: int
    frames_held: int = Field(description="Frames kept in memory (a live session drops old ones).")
    objects: list[int] = Field(description="Object ids prompted so far.")
    memory_bytes: int = Field(description="Memory the session holds (frames and tracking state).")
    text: str | None = Field(None, description="SAM 3: the concept text the session tracks (one at a time).")
    width: int | None
    height: int | None
    live: bool
    propagating: bool
    idle_s: float
    expires_in: float
    age_s: float
    last_propagation: dict[str, Any] | None = Field(
        description="The last propagation: frames computed, how it ended (done, withdrawn, failed)."
    )


# --------------------------------------------------------------------------- the family's prompt


class SessionPrompts:
    """What a session's prompt is for one family, the only part of the session routes that
    differs between them: the request and frame schemas, reading the request in the HTTP process,
    applying it to the session in the worker, and rendering a frame. This default is SAM 2's."""

    request: type[StrictRequest] = PromptRequest
    frame: type[BaseModel] = FrameObjects

    def read(self, api: FamilyAPI, request: PromptRequest) -> PromptRequest:
        """The request as the worker gets it (HTTP process, off the event loop): the mask's
        base64 decoded to the PNG file's bytes."""
        if request.mask is None:
            return request
        return request.model_copy(update={"mask": _decode_base64(request.mask, "mask")})

    def apply(self, api: FamilyAPI, session: Any, r: PromptRequest) -> Any:
        """The prompt on the session (worker); answers the prompted frame's FrameResult."""
        mask = None
        if r.mask is not None:
            mask = np.asarray(decode_image(r.mask, api.cfg.limits).convert("L")) > 0
        return session.add_prompt(
            r.frame_index,
            r.obj_id,
            points=None if r.points is None else np.asarray(r.points, dtype=np.float32),
            labels=None if r.labels is None else np.asarray(r.labels, dtype=np.int32),
            box=None if r.box is None else np.asarray(r.box, dtype=np.float32),
            mask=mask,
            clear_old_points=r.clear_old_points,
        )

    def answer(self, api: FamilyAPI, result: Any, encoding: str) -> dict[str, Any]:
        """One frame's JSON (``frame`` is its schema)."""
        return video.frame_answer(result, encoding)


# --------------------------------------------------------------------------- worker side


def _rgb(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class _SessionRoute(Route):
    """A session call in the worker: each runs alone (its own batch key) and its APIError
    answers it alone. The session holds its own model, so a call on it never loads the family's
    default (``load: lazy``); only :class:`CreateSession` takes the model it names."""

    endpoint = False
    uses_model = False

    def batch_key(self, item: Job) -> int:
        return id(item)

    def predict(self, model: Any, items: list[Job]) -> list[Any]:
        out = []
        for job in items:
            try:
                out.append(self.run(model, job))
            except APIError as e:
                out.append(e)
        return out

    def run(self, model: Any, job: Job) -> dict | Stream:
        """The call on its session: the answer, already rendered (frames by the family's
        :class:`SessionPrompts`), or a Stream of them."""
        raise NotImplementedError

    def encode(self, job: Job, item: Job, output: dict | Stream) -> dict | Stream:
        return output

    @property
    def store(self) -> SessionStore:
        return self.api.video.store()


class CreateSession(_SessionRoute):
    name = "video.create"
    uses_model = True
    request = CreateSessionRequest
    response = SessionCreated
    summary = "Open a tracking session."

    def run(self, model: Any, job: Job) -> dict:
        r: CreateSessionRequest = job.request  # video and frames hold file bytes (_create_job)
        limits = self.api.cfg.limits
        if r.video is not None:
            frames = video.decode_video(r.video, r.max_frames, limits.max_image_pixels)
        elif r.frames is not None:
            frames = [_rgb(decode_image(data, limits)) for data in r.frames]
            if len({f.shape for f in frames}) > 1:
                raise APIError(400, "the frames differ in size; send frames of one size", param="frames")
        else:
            frames = None
        store = self.store
        session_id = store.reserve()
        session = self.api.open_video(
            model,
            frames,
            offload_video_to_cpu=r.offload_video_to_cpu,
            offload_state_to_cpu=r.offload_state_to_cpu,
        )
        entry = store.add(session_id, session, job.model_id)
        return {
            "session_id": session_id,
            "num_frames": session.num_frames,
            "width": session.width,
            "height": session.height,
            "live": session.live,
            "model": job.model_id,
            "expires_in": store.expires_in(entry),
        }


class DescribeSession(_SessionRoute):
    name = "video.get"
    request = BaseModel
    response = SessionInfo
    summary = "A session's frames, objects, memory and idle time."

    def run(self, model: Any, job: Job) -> dict:
        sid = job.session_id
        return {**self.store.describe(sid, self.store.get(sid, touch=False)), "worker": self.api.worker_id}


class DeleteSession(_SessionRoute):
    name = "video.delete"
    request = BaseModel
    response = BaseModel
    summary = "Close a session and free its memory."

    def run(self, model: Any, job: Job) -> dict:
        self.store.remove(job.session_id)
        return {"deleted": True}


class AddPrompt(_SessionRoute):
    name = "video.prompt"
    request = PromptRequest
    response = FrameObjects
    summary = "Prompt one object on one frame; answers that frame's objects."

    def run(self, model: Any, job: Job) -> dict:
        entry = self.store.usable(job.session_id)
        prompts = self.api.video.prompts
        result = prompts.apply(self.api, entry.session, job.request)
        entry.refresh()
        return prompts.answer(self.api, result, job.request.mask_encoding)


class AddFrame(_SessionRoute):
    name = "video.frame"
    request = FrameRequest
    response = FrameObjects
    summary = "Append one frame to a live session and track it at once."

    def run(self, model: Any, job: Job) -> dict:
        entry = self.store.usable(job.session_id)
        if not entry.session.live:
            raise APIError(
                400,
                "this session was opened on a clip; frames are added only to live sessions (POST "
                ".../video/sessions without video, frames or video_path)",
                param="session_id",
            )
        result = entry.session.add_frame(_rgb(job.image))
        entry.refresh()
        return self.api.video.prompts.answer(self.api, result, job.request.mask_encoding)


class Propagate(_SessionRoute):
    name = "video.propagate"
    request = PropagateRequest
    response = FrameObjects
    summary = "Track the prompted objects through the clip, streamed one frame per NDJSON line."

    def run(self, model: Any, job: Job) -> Stream:
        r: PropagateRequest = job.request
        sid = job.session_id
        store = self.store
        entry = store.usable(sid)
        entry.busy = True
        entry.last_propagation = {"frames": 0, "ended": None, "direction": r.direction}

        def ended(how: str) -> None:
            entry.busy = False
            store.touch(entry)
            entry.last_propagation["ended"] = how
            entry.refresh()

        return Stream(self._lines(sid, entry, r), on_close=ended)

    def _lines(self, sid: str, entry: Entry, r: PropagateRequest) -> Iterator[dict]:
        t0 = time.perf_counter()
        results = entry.session.propagate(r.direction, r.start_frame_index, r.max_frames)
        indices = []
        try:
            while True:
                if entry.closed:
                    raise lost(sid, "it was deleted or evicted during this propagation")
                result = next(results, None)
                if result is None:
                    break
                indices.append(result.frame_index)
                entry.last_propagation["frames"] = len(indices)
                yield self.api.video.prompts.answer(self.api, result, r.mask_encoding)
            seconds = time.perf_counter() - t0
            yield {
                "done": True,
                "frames": len(indices),
                "first_frame_index": indices[0] if indices else None,
                "last_frame_index": indices[-1] if indices else None,
                "seconds": round(seconds, 4),
                "frames_per_s": round(len(indices) / seconds, 3) if seconds > 0 else None,
            }
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()


VIDEO_ROUTES: tuple[type[Route], ...] = (
    CreateSession,
    DescribeSession,
    DeleteSession,
    AddPrompt,
    AddFrame,
    Propagate,
)


# --------------------------------------------------------------------------- HTTP side


def _decode_base64(text: str, param: str) -> bytes:
    try:
        data = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            data = pybase64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(
                400, f"'{param}' is not valid base64 ({e})", param=param, code="invalid_base64"
            ) from None
    if not data:
        raise APIError(400, f"'{param}' is empty", param=param)
    return data


def documented(summary: str, status_code: int = 200, responses: dict | None = None) -> Callable:
    """What /docs says of an endpoint (apis/litserve_internals.py passes it to FastAPI)."""

    def mark(fn: Callable) -> Callable:
        fn.route_options = {"summary": summary, "status_code": status_code, "responses": responses or {}}
        return fn

    return mark


def ndjson_doc(frame: type[BaseModel]) -> dict:
    """/docs' answer of /propagate: lines of the family's frame schema."""
    name = frame.__name__
    return {
        200: {
            "description": f"application/x-ndjson: one {name} line per frame as it is computed, then "
            '{"done": true, "frames", "first_frame_index", "last_frame_index", "seconds", "frames_per_s"}',
            "content": {"application/x-ndjson": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


class VideoSessions:
    """A family's session routes: the HTTP endpoints, and in each worker the session store."""

    def __init__(self, api: FamilyAPI, prompts: SessionPrompts | None = None):
        self.api = api
        self.prompts = prompts or SessionPrompts()
        self.settings = api.fam.video
        self._store: SessionStore | None = None

    # -- worker ---------------------------------------------------------------------------
    def store(self) -> SessionStore:
        """The worker's sessions, named by its connection's token (set once it has connected)."""
        if self._store is None:
            assert self.api.token is not None, "sessions are made only by a connected worker"
            self._store = SessionStore(self.api.token, self.settings.max_sessions, self.settings.idle_ttl_s)
        return self._store

    def stats(self) -> dict[str, Any]:
        """For the worker's counters (/info, /metrics); none before the worker has connected."""
        return {} if self._store is None else {"video_sessions": self._store.stats()}

    # -- HTTP process ---------------------------------------------------------------------
    def endpoints(self) -> list[tuple[str, Callable, list[str]]]:
        base = f"/{self.api.family}/video/sessions"
        return [
            (base, self._create_endpoint(), ["POST"]),
            (base + "/{session_id}", self.describe, ["GET"]),
            (base + "/{session_id}", self.delete, ["DELETE"]),
            (base + "/{session_id}/prompts", self._typed(self.prompt, self.prompts.request), ["POST"]),
            (
                base + "/{session_id}/propagate",
                self._typed(self.propagate, PropagateRequest, stream=True),
                ["POST"],
            ),
            (base + "/{session_id}/frames", self._typed(self.add_frame, FrameRequest), ["POST"]),
        ]

    def _typed(self, method: Callable, request: type[BaseModel], stream: bool = False) -> Callable:
        """``method(request, session_id)`` as an endpoint whose request and answer are the
        family's schemas (FastAPI reads them from the signature); a ``stream`` answers NDJSON lines
        of the frame schema."""

        async def endpoint(request: BaseModel, session_id: str) -> Response:
            return await method(request, session_id)

        param = inspect.Parameter.POSITIONAL_OR_KEYWORD
        endpoint.__signature__ = inspect.Signature(
            [
                inspect.Parameter("request", param, annotation=request),
                inspect.Parameter("session_id", param, annotation=str),
            ],
            return_annotation=Response if stream else self.prompts.frame,
        )
        endpoint.__name__ = f"{self.api.family}_video_{method.__name__}"
        endpoint.__doc__ = method.__doc__
        endpoint.route_options = dict(method.route_options)
        if stream:
            endpoint.route_options["responses"] = ndjson_doc(self.prompts.frame)
        return endpoint

    def _create_job(self, request: CreateSessionRequest) -> Job:
        s = self.settings
        fields = self.api.selector_fields()
        entry = self.api.registry.resolve(*(getattr(request, f, None) for f in fields))
        if request.max_frames is not None and request.max_frames > s.max_frames:
            raise APIError(
                400,
                f"max_frames {request.max_frames} is over this server's limit of {s.max_frames} "
                "(video.max_frames)",
                param="max_frames",
            )
        data = frames = None
        if request.video is not None:
            data = _decode_base64(request.video, "video")
        elif request.video_path is not None:
            data = read_path(request.video_path, self.api.cfg.inputs.path, s.max_video_bytes, "video_path")
        elif request.frames is not None:
            if len(request.frames) > s.max_frames:
                raise APIError(
                    413,
                    f"{len(request.frames)} frames sent; this server takes at most {s.max_frames} "
                    "(video.max_frames)",
                    param="frames",
                )
            frames = [_decode_base64(f, "frames") for f in request.frames]
            for f in frames:
                probe_image(f, self.api.cfg.limits)
        size = len(data) if data is not None else sum(map(len, frames or ()))
        if size > s.max_video_bytes:
            raise APIError(
                413,
                f"the clip is {size} bytes; this server takes at most {s.max_video_bytes} "
                "(video.max_video_bytes)",
                param="video" if request.frames is None else "frames",
            )
        # the family's request type is made at run time (its selector fields): the worker gets
        # the plain CreateSessionRequest, the clip's bytes in place of its text or path
        read = CreateSessionRequest.model_construct(
            **{f: getattr(request, f) for f in CreateSessionRequest.model_fields},
        ).model_copy(
            update={
                "video": data,
                "frames": frames,
                "video_path": None,
                "max_frames": request.max_frames or s.max_frames,
            }
        )
        return Job(CreateSession.name, self.api.registry.id_of(entry), read)

    def _create_endpoint(self) -> Callable:
        """POST .../sessions, whose request has the family's model selector fields too (SAM 2:
        model_cfg, checkpoint_path)."""
        name = f"{self.api.family.capitalize()}CreateSessionRequest"
        request_type = type(name, (CreateSessionRequest, self.api.selector), {"__module__": __name__})

        async def create(request: BaseModel) -> Response:
            job = await self.api.spec.off_loop(self._create_job, request)
            return reply_response(await self.api.spec.submit(job), status=201)

        create.__signature__ = inspect.Signature(
            [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=request_type)],
            return_annotation=SessionCreated,
        )
        create.__name__ = f"{self.api.family}_video_create"
        create.__doc__ = "A clip as video, frames or video_path; none of them for a live session."
        return documented("Open a video tracking session (201)", 201)(create)

    def _pin(self, session_id: str) -> str:
        """The token of the worker holding the session; 404 or 410 answered here when there is none."""
        token = worker_token(session_id)
        state = self.api.spec.dispatcher.pin_state(token) if token is not None else "unknown"
        if state == "unknown":
            raise not_found(session_id)
        if state == "gone":
            raise lost(session_id, "the model worker that held it stopped or was restarted")
        return token

    def _job(
        self, route: type[Route], session_id: str, request: BaseModel | None, image: bytes | None = None
    ) -> Job:
        model_id = self.api.registry.id_of(self.api.registry.default)  # unused: uses_model is False
        return Job(route.name, model_id, request, image_bytes=image, session_id=session_id)

    @documented("A video session's frames, objects, memory and idle time")
    async def describe(self, session_id: str) -> SessionInfo:
        """A session's frames, objects, memory and idle time."""
        token = self._pin(session_id)
        return reply_response(
            await self.api.spec.submit(self._job(DescribeSession, session_id, None), pin=token)
        )

    @documented("Close a video session (204)", 204, {204: {"description": "Closed; its memory is freed."}})
    async def delete(self, session_id: str) -> Response:
        """Close a session and free its memory (204); a propagation of it in progress stops."""
        token = self._pin(session_id)
        reply = await self.api.spec.submit(self._job(DeleteSession, session_id, None), pin=token)
        return Response(status_code=204) if reply.status == 200 else reply_response(reply)

    @documented("Prompt a video session on one frame")
    async def prompt(self, request: StrictRequest, session_id: str) -> Response:
        """A prompt on one frame (SAM 2: points, a box or a mask for one object; SAM 3: a text,
        exemplar boxes or points); answers that frame's objects."""
        token = self._pin(session_id)
        read = await self.api.spec.off_loop(self.prompts.read, self.api, request)
        return reply_response(await self.api.spec.submit(self._job(AddPrompt, session_id, read), pin=token))

    @documented("Append a frame to a live video session and track it")
    async def add_frame(self, request: FrameRequest, session_id: str) -> Response:
        """Append one frame to a live session; answers its tracked objects at once."""
        token = self._pin(session_id)

        def read() -> bytes:
            data = read_image_bytes(request, self.api.cfg)
            probe_image(data, self.api.cfg.limits)
            return data

        image = await self.api.spec.off_loop(read)
        job = self._job(AddFrame, session_id, request.model_copy(update=dict.fromkeys(IMAGE_FIELDS)), image)
        return reply_response(await self.api.spec.submit(job, pin=token))

    @documented("Track the prompted objects through the clip (NDJSON stream)")
    async def propagate(self, request: PropagateRequest, session_id: str) -> Response:
        """Track the prompted objects: ``application/x-ndjson``, one line per frame as soon as it is
        computed, then a totals line (``"done": true``). Closing the connection stops it."""
        token = self._pin(session_id)
        parts = self.api.spec.stream(self._job(Propagate, session_id, request), pin=token)
        try:
            first = await anext(parts)
        except BaseException:
            await parts.aclose()
            raise
        if not first.more:  # refused before its first frame (a frame out of range, a busy session)
            await parts.aclose()
            return reply_response(first)
        return PartsResponse(first, parts)


class ServesVideo:
    """Mixin of a FamilyAPI with video sessions (before FamilyAPI in the bases): its session
    endpoints, idle expiry and the sessions in its counters. The family lists
    :data:`VIDEO_ROUTES` in its routes, has a ``video:`` block in its settings and implements
    ``open_video(model, frames, **offload)``; ``video_prompts`` when its prompt is not SAM 2's."""

    video_prompts: type[SessionPrompts] = SessionPrompts

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.video = VideoSessions(self, self.video_prompts())

    def endpoints(self) -> list[tuple[str, Callable, list[str]]]:
        return [*super().endpoints(), *self.video.endpoints()]

    def housekeeping(self) -> None:
        super().housekeeping()
        self.video.store().expire()

    def extra_stats(self) -> dict[str, Any]:
        return {**super().extra_stats(), **self.video.stats()}
