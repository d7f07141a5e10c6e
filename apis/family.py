"""What every model family shares: one LitAPI per family serving several routes through one queue.

A family's routes (``/clip/extract``, ``/clip/encode_text``, ...) are endpoints of one
:class:`FamilyEndpoints`, so one worker process holds ONE copy of each model however many routes
use it. Work is split where it is cheapest to refuse bad input:

* HTTP process (:meth:`FamilyAPI.job_for`): pydantic validation, model lookup, reading the
  image bytes and checking the image header. Errors answer at once and never reach a worker.
* worker (the LitAPI hooks ``decode_request``, ``predict``, ``encode_response``): pixel
  decoding and the model, through each :class:`Route`'s own hooks. Each request's failure is
  carried as a value, so one bad request never fails the others in its batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import litserve as ls
import torch
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel

from apis.config import ServerConfig
from apis.core import withdrawal
from apis.core.errors import APIError
from apis.core.image_ids import content_id
from apis.core.images import decode_image, probe_image
from apis.core.logs import REQUEST_ID, configure_logging
from apis.core.precision import resolve_dtype
from apis.core.process import die_with_parent, reuse_freed_memory
from apis.core.registry import Key, ModelRegistry, canonical
from apis.core.replies import Reply, Stream
from apis.core.settings import ModelEntry
from apis.core.weights import hub_file, is_hf_uri
from apis.http import metrics
from apis.http.inputs import IMAGE_FIELDS, ImageInput, read_image_bytes
from apis.http.responses import error_response, reply_response
from apis.litserve_internals import FamilyEndpointsBase, WorkerLoop
from apis.transport.dispatch import Dispatcher

log = logging.getLogger("visionserve")

#: Threads that read and check image inputs (base64, URL, file; header probe). Pillow parses some
#: headers in Python, so a crafted file costs its thread, never the event loop (/health and every
#: other request). Bounded: more image requests than this wait for a free thread.
READ_THREADS = 8


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
    image: Image.Image | None = field(default=None, repr=False)
    request_id: str = "-"  # the worker's log lines name it (apis/http/metrics.py)
    image_id: str | None = None


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
    :meth:`FamilyAPI.worker_stats`) and the server's devices: ``device`` and ``gpu_id`` of the
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


class FamilyAPI(ls.LitAPI):
    """Base LitAPI of a model family. Subclasses set the class attributes, list their
    :class:`Route` classes and implement :meth:`load_model`."""

    family: ClassVar[str]
    routes: ClassVar[tuple[type[Route], ...]]
    selector: ClassVar[type[BaseModel]]  # the request fields that pick a model (a mixin of every request)
    model_key: Callable[..., Key] = staticmethod(canonical)
    model_fill_defaults: ClassVar[bool] = True  # see ModelRegistry.resolve

    def __init__(self, cfg: ServerConfig, dtype: str = "auto", log_level: str = "info"):
        fam = cfg.families()[self.family]
        super().__init__(
            max_batch_size=fam.max_batch_size,
            batch_timeout=fam.batch_timeout,
            spec=FamilyEndpoints(self),
            loop=WorkerLoop(),
        )
        self.cfg = cfg
        self.fam = fam
        self.dtype_name = dtype
        self.log_level = log_level
        self.handlers: dict[str, Route] = {route.name: route(self) for route in self.routes}
        self.registry = ModelRegistry(
            self.family,
            fam.models,
            self.selector_fields(),
            key=self.model_key,
            fill_defaults=self.model_fill_defaults,
        )
        self.stats: Any = None  # shared dict, set by the server before workers start
        self.token: str | None = None  # worker: its connection's token (apis/transport/worker_loop.py)
        self.live_stats: dict[str, dict] = {}  # HTTP process: counters that came with answers

    @classmethod
    def selector_fields(cls) -> tuple[str, ...]:
        return tuple(cls.selector.model_fields)

    # ------------------------------------------------------------------ HTTP process
    def job_for(self, route: Route, request: BaseModel) -> Job:
        """The job a worker runs for ``request``: model looked up, checks that need the config,
        image bytes read and their header checked; raises APIError."""
        fields = self.selector_fields()
        entry = self.registry.resolve(*(getattr(request, f, None) for f in fields))
        route.check(request)
        image, image_id = None, getattr(request, "image_id", None)
        if isinstance(request, ImageInput) and image_id is None:
            image = read_image_bytes(request, self.cfg)
            route.check_image(request, probe_image(image, self.cfg.limits))
            if route.caches_image:
                image_id = content_id(image)
        params = request.model_dump(exclude={*IMAGE_FIELDS, "image_id", *fields})
        job = Job(route.name, self.registry.id_of(entry), params, image_bytes=image, image_id=image_id)
        return route.read_inputs(job, request)

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

    # ------------------------------------------------------------------ worker process
    def setup(self, device: str) -> None:
        die_with_parent()
        reuse_freed_memory()
        configure_logging(self.log_level)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.torch_device = torch.device(device)
        self.compute_dtype = resolve_dtype(self.dtype_name, device)
        self.worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self._models: dict[str, Any] = {}
        self._load_seconds: dict[str, float] = {}
        self._requests: dict[str, Counter] = defaultdict(Counter)
        self._batches: dict[str, Counter] = defaultdict(Counter)
        self._forwards: dict[str, Counter] = defaultdict(Counter)
        if self.fam.load == "eager":
            for entry in self.registry.entries:
                self.model(entry)
        self._publish()

    def load_model(self, entry: ModelEntry) -> Any:
        raise NotImplementedError

    def model(self, entry: ModelEntry) -> Any:
        """The worker's one instance of ``entry``, loaded on first use."""
        key = self.registry.id_of(entry)
        if key not in self._models:
            t0 = time.perf_counter()
            if is_hf_uri(entry.weights):  # already in the hub cache: the server fetched it at start-up
                entry = entry.model_copy(update={"weights": hub_file(entry.weights)})
            if entry.is_random:  # same random weights in every worker and after every restart
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(zlib.crc32(key.encode()))
                    self._models[key] = self.load_model(entry)
            else:
                self._models[key] = self.load_model(entry)
            self._load_seconds[key] = time.perf_counter() - t0
            log.info(
                "%s worker %d loaded %s on %s (%s, weights: %s) in %.1fs",
                self.family,
                self.worker_id,
                key,
                self.torch_device,
                str(self.compute_dtype).removeprefix("torch."),
                entry.weights_source,
                self._load_seconds[key],
            )
            if entry.is_random:
                log.warning("%s model %s has RANDOM weights: its outputs are meaningless", self.family, key)
        return self._models[key]

    def housekeeping(self) -> None:
        """Called by the worker's loop when it is idle (about once a second): expire old state."""

    def decode_request(self, request: Job) -> Job | APIError:
        """The image's pixels, decoded here in the worker; the route decodes the rest."""
        if request.image_bytes is not None:
            try:
                request.image = decode_image(request.image_bytes, self.cfg.limits)
            except APIError as e:
                return e
        return request

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def unbatch(self, output: list) -> list:
        return output

    def predict(self, x):
        """The batch's jobs grouped by route and model, each group through its route's hooks."""
        items = x if self.max_batch_size > 1 else [x]
        results: list[Any] = list(items)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if isinstance(item, Job):
                groups[(item.route, item.model_id)].append(i)
        for (name, model_id), idx in groups.items():
            self._batches[name][len(idx)] += 1
            for i, out in zip(idx, self._run(name, model_id, [items[i] for i in idx]), strict=True):
                results[i] = out
        for i, item in enumerate(items):
            name = item.route if isinstance(item, Job) else "decode"
            res = results[i]
            self._requests[name][
                "ok"
                if not isinstance(res, APIError)
                else ("server_error" if res.status >= 500 else "client_error")
            ] += 1
        return results if self.max_batch_size > 1 else results[0]

    def _run(self, name: str, model_id: str, jobs: list[Job]) -> list:
        try:
            model = self.model(self.registry.by_id(model_id))
            return self._through(self.handlers[name], model, jobs)
        except APIError as e:
            return [e] * len(jobs)
        except Exception:
            if len(jobs) > 1:  # find the culprit: run each request on its own
                return [out for job in jobs for out in self._run(name, model_id, [job])]
            log.exception("%s/%s failed", self.family, name)
            return [
                APIError(
                    500,
                    f"internal error while running {self.family}/{name} (details are in the server log)",
                    code="internal_error",
                )
            ]

    def _through(self, route: Route, model: Any, jobs: list[Job]) -> list:
        """``route``'s hooks over ``jobs``: decode each, predict once per batch key, encode each."""
        out: list[Any] = [None] * len(jobs)
        groups: dict[Hashable, list[tuple[int, Any]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            try:
                item = route.decode_request(model, job)
            except APIError as e:
                out[i] = e
                continue
            groups[route.batch_key(item)].append((i, item))
        for members in groups.values():
            self._forwards[route.name][len(members)] += 1
            try:
                with withdrawal.serving([jobs[i] for i, _ in members]):
                    outputs = route.predict(model, [item for _, item in members])
            except withdrawal.Withdrawn as e:  # nobody waits for these answers any more
                log.info("%s/%s stopped: %s", self.family, route.name, e)
                for i, _ in members:
                    out[i] = APIError(499, "the client closed the request", code="client_closed")
                continue
            for (i, item), output in zip(members, outputs, strict=True):
                try:
                    out[i] = route.encode_response(model, jobs[i], item, output)
                except APIError as e:
                    out[i] = e
        return out

    def encode_response(self, output: dict | APIError | Reply | Stream) -> Reply | Stream:
        """The answer rendered here, in the worker (apis/core/replies.py). A stream's parts are
        rendered by the worker's loop, and its last part comes back here for the counters."""
        if isinstance(output, Stream):
            return output
        reply = Reply.of(output)
        if self.stats is not None:
            # The worker's counters ride back with each answer: fresh in /info as soon as the
            # client has its answer, and no IPC round trip per request.
            reply.stats = (self.stats_key, self._snapshot())
        return reply

    @property
    def stats_key(self) -> str:
        return f"{self.family}/{self.worker_id}"

    def _publish(self) -> None:
        """Post the counters to the server's shared dict (at start-up, before any answer)."""
        if self.stats is not None:
            self.stats[self.stats_key] = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "updated": time.time(),
            "family": self.family,
            "worker": self.worker_id,
            "pid": os.getpid(),
            "device": str(self.torch_device),
            "dtype": str(self.compute_dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),  # from OMP_NUM_THREADS when set (deploy/k8s)
            "models_loaded": sorted(self._models),
            "load_seconds": dict(self._load_seconds),
            "requests": {op: dict(c) for op, c in self._requests.items()},
            "batch_sizes": _histograms(self._batches),
            "forward_batch_sizes": _histograms(self._forwards),
            **gpu_memory(self.torch_device),
            **self.extra_stats(),
        }

    def worker_stats(self) -> dict[str, dict]:
        """Every worker's latest counters: start-up posts and answers' copies, newest wins."""
        latest = dict(self.stats or {})
        for key, snap in list(self.live_stats.items()):
            if key not in latest or snap["updated"] >= latest[key]["updated"]:
                latest[key] = snap
        return {k: v for k, v in latest.items() if v["family"] == self.family}

    def extra_stats(self) -> dict[str, Any]:
        """Family-specific counters for ``/info`` (caches, encoder calls)."""
        return {}


def gpu_memory(device: torch.device) -> dict[str, dict[str, int]]:
    """Bytes of the GPU that this worker's torch allocator holds (``allocated``: in tensors,
    ``reserved``: cached by the allocator, ``peak_allocated``: the most since start); nothing on
    CPU. onnxruntime's own arena (RMBG) is not seen by torch's allocator."""
    if device.type != "cuda":
        return {}
    return {
        "gpu_memory": {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "peak_allocated": torch.cuda.max_memory_allocated(device),
        }
    }


def _histograms(counters: dict[str, Counter]) -> dict[str, dict[str, int]]:
    return {op: {str(k): v for k, v in sorted(c.items())} for op, c in counters.items()}
