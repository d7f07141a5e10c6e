"""A family in the HTTP process: its endpoints, the job each request becomes, the dispatcher that
submits jobs to the family's workers, and ``GET /<family>/health``.

Nothing here runs a model: this module and what it imports take no torch (an import-linter
contract and tests/http/test_http_process.py check it), so the HTTP process stays small.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from apis.core.errors import APIError
from apis.core.images import content_id, probe_image
from apis.core.logs import REQUEST_ID
from apis.core.replies import Reply
from apis.http import metrics
from apis.http.inputs import IMAGE_FIELDS, ImageInput, read_image_bytes
from apis.http.routing import error_response, reply_response
from apis.litserve_internals import FamilyEndpointsBase
from apis.route import Job, Route
from apis.transport.dispatch import Dispatcher

if TYPE_CHECKING:
    from apis.config import ServerConfig
    from apis.core.registry import ModelRegistry
    from apis.core.settings import Family
    from apis.family import FamilyAPI

#: Threads that read and check image inputs (base64, URL, file; header probe). Pillow parses some
#: headers in Python, so a crafted file costs its thread, never the event loop (/health and every
#: other request). Bounded: more image requests than this wait for a free thread.
READ_THREADS = 8


class FamilyEndpoints(FamilyEndpointsBase):
    """Registers a family's POST routes and its ``GET /<family>/health``; requests go to the
    family's workers through its :class:`~apis.transport.dispatch.Dispatcher`."""

    def __init__(self, api: FamilyAPI):
        super().__init__(api.family)
        self._api = api
        self.dispatcher: Dispatcher | None = None
        self.address: str | None = None  # what a worker connects to
        self._reading: ThreadPoolExecutor | None = None  # made in the HTTP process

    def __getstate__(self):
        # Endpoints and the dispatcher (sockets, requests in flight) belong to the HTTP process;
        # a worker, also one restarted while requests wait, needs only the address.
        state = super().__getstate__()
        state["dispatcher"] = None
        state["_reading"] = None
        return state

    def pre_setup(self, lit_api: FamilyAPI):
        # a worker takes its queue a batch at a time: one batch more than the least busy worker
        # delays a request by one batch, less than encoding its image again elsewhere
        self.dispatcher = Dispatcher(lit_api.family, slack=lit_api.max_batch_size)
        self.address = self.dispatcher.address
        for route in lit_api.handlers.values():
            if route.endpoint:
                self.add_endpoint(f"{self.api_path}/{route.name}", self._endpoint(route), ["POST"])
        for path, endpoint, methods in lit_api.endpoints():
            self.add_endpoint(path, endpoint, methods)
        self.add_endpoint(f"{self.api_path}/health", self.health, ["GET", "HEAD"])
        self._reading = ThreadPoolExecutor(READ_THREADS, thread_name_prefix=f"{lit_api.family}-read")

    @property
    def reading(self) -> ThreadPoolExecutor:
        """The threads that read image inputs (also /v1/embeddings' images and URLs)."""
        return self._reading

    def _endpoint(self, route: Route) -> Callable:
        async def endpoint(request):
            try:
                if isinstance(request, ImageInput) or route.reads_files:
                    job = await self.off_loop(self._api.job_for, route, request)
                else:
                    job = self._api.job_for(route, request)
            except APIError as e:
                return error_response(e)
            return reply_response(await self.submit(job))

        endpoint.__signature__ = inspect.Signature(
            [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=route.request)],
            return_annotation=route.response,
        )
        endpoint.__name__ = f"{self._api.family}_{route.name}"
        endpoint.__doc__ = route.summary
        return endpoint

    async def off_loop(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in the family's reading threads: base64 decoding, URL or disk I/O and
        header probes stay off the event loop. The request id goes along, for log lines."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._reading, ctx.run, fn, *args)

    async def submit(self, job: Job, pin: str | None = None) -> Reply:
        """A worker's answer to a job (also what apis/openai_routes.py sends); ``pin``: the
        worker whose connection has that token (apis/transport/dispatch.py)."""
        job.request_id = REQUEST_ID.get()
        exchange = metrics.CURRENT.get()
        if exchange is not None:  # /v1/* learns its family here
            exchange.serves(self._api.family)
        affinity = self._api.affinity(job)
        # a request with only an image_id can be answered only where that image is cached
        stay = job.image_id is not None and job.image_bytes is None
        reply = await self.dispatcher.submit(job, affinity, stay=stay, pin=pin)
        if exchange is not None:
            exchange.answered(reply)
        self._keep_stats(reply)
        return reply

    async def stream(self, job: Job, pin: str | None = None) -> AsyncIterator[Reply]:
        """A worker's answer to a job in parts (a :class:`~apis.core.replies.Stream`)."""
        job.request_id = REQUEST_ID.get()
        exchange = metrics.CURRENT.get()
        if exchange is not None:
            exchange.serves(self._api.family)
        parts = self.dispatcher.stream(job, pin)
        try:
            async for reply in parts:
                if exchange is not None and not reply.more:  # the last part carries the timings
                    exchange.answered(reply)
                self._keep_stats(reply)
                yield reply
        finally:
            await parts.aclose()

    def _keep_stats(self, reply: Reply) -> None:
        if reply.stats is not None:
            key, snapshot = reply.stats
            self._api.live_stats[key] = snapshot

    async def health(self) -> JSONResponse:
        """Open readiness of this family's workers (what the seed clients poll): 200 only when
        every worker is ready, with seed 004's HealthResponse fields (README "Health")."""
        states = self.worker_states(self._api.family)
        ready = sum(states)
        ok = bool(states) and ready == len(states)
        body = {
            "status": "ok" if ok else "starting",
            **health_fields(self._api.worker_stats(), self._server.devices),
            "family": self._api.family,
            "workers_ready": ready,
            "workers": len(states),
        }
        return JSONResponse(body, status_code=200 if ok else 503)


def health_fields(workers: dict[str, dict], devices: Sequence[str | Sequence[str]]) -> dict[str, Any]:
    """Seed 004's HealthResponse fields for one family, from its workers' counters (``workers``,
    :meth:`FamilyFront.worker_stats`) and the server's devices: ``device`` and ``gpu_id`` of the
    family's workers (comma-joined / the first GPU's index when they span several), ``gpu_count``
    the GPUs this server runs on, ``worker_id`` the pid of the process that answers,
    ``models_loaded`` the model ids loaded by any worker, ``total_model_instances`` the copies
    across workers, ``request_counter`` the requests the workers have answered."""
    snaps = sorted(workers.values(), key=lambda w: w["worker"])
    used = list(dict.fromkeys(w["device"] for w in snaps))
    gpus = {d for ds in devices for d in ([ds] if isinstance(ds, str) else ds) if d.startswith("cuda")}
    first_gpu = next((d for d in used if d.startswith("cuda")), None)
    return {
        "device": ",".join(used) or "unknown",
        "worker_id": os.getpid(),
        "gpu_id": int(first_gpu.partition(":")[2] or 0) if first_gpu else None,
        "gpu_count": len(gpus),
        "models_loaded": sorted({m for w in snaps for m in w["models_loaded"]}),
        "total_model_instances": sum(len(w["models_loaded"]) for w in snaps),
        "request_counter": sum(
            n for w in snaps for counts in w["requests"].values() for n in counts.values()
        ),
    }


class FamilyFront:
    """The :class:`~apis.family.FamilyAPI` methods that run in the HTTP process: a request
    validated into a :class:`Job`, the worker it should go to, and the workers' counters."""

    family: str
    cfg: ServerConfig
    fam: Family
    registry: ModelRegistry
    handlers: dict[str, Route]
    stats: Any
    live_stats: dict[str, dict]

    @classmethod
    def selector_fields(cls) -> tuple[str, ...]:
        return tuple(cls.selector.model_fields)

    def job_for(self, route: Route, request: BaseModel) -> Job:
        """The job a worker runs for ``request``: model looked up, checks that need the config,
        image bytes read and their header checked; raises APIError."""
        entry = self.registry.resolve(*(getattr(request, f, None) for f in self.selector_fields()))
        route.check(request)
        image, image_id = None, getattr(request, "image_id", None)
        if isinstance(request, ImageInput):
            if image_id is None:
                image = read_image_bytes(request, self.cfg)
                route.check_image(request, probe_image(image, self.cfg.limits))
                if route.caches_image:
                    image_id = content_id(image)
            request = request.model_copy(update=dict.fromkeys(IMAGE_FIELDS))  # the bytes travel once
        return Job(
            route.name, self.registry.id_of(entry), route.read_inputs(request), image, image_id=image_id
        )

    def endpoints(self) -> list[tuple[str, Callable, list[str]]]:
        """Endpoints besides ``POST /<family>/<route>``: (path, endpoint, methods); the video
        session routes (apis/video_sessions.py)."""
        return []

    def affinity(self, job: Job) -> Hashable | None:
        """For a route that caches encoded images, the key that sends every request on one image
        for this model to the same worker (:class:`~apis.transport.dispatch.Dispatcher`): its
        image_id, whether the request sent the image or only the id."""
        if not self.handlers[job.route].caches_image or job.image_id is None or not self.fam.route_by_image:
            return None
        return job.model_id, job.image_id

    def check_text_length(self, texts: Sequence[tuple[str, str]], param: str) -> None:
        """400 for the first of ``texts`` ((name, text) pairs) over ``limits.max_text_chars``."""
        limit = self.cfg.limits.max_text_chars
        for name, text in texts:
            if len(text) > limit:
                raise APIError(
                    400,
                    f"{name} has {len(text)} characters, longer than this server's limit of {limit}",
                    param=param,
                )

    def worker_stats(self) -> dict[str, dict]:
        """Every worker's latest counters: start-up posts and answers' copies, newest wins."""
        latest = dict(self.stats or {})
        for key, snap in list(self.live_stats.items()):
            if key not in latest or snap["updated"] >= latest[key]["updated"]:
                latest[key] = snap
        return {k: v for k, v in latest.items() if v["family"] == self.family}
