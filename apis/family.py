"""What every model family shares: one LitAPI per family serving several routes through one queue.

A family's routes (``/clip/extract``, ``/clip/encode_text``, ...) are endpoints of one
:class:`FamilySpec`, so one worker process holds ONE copy of each model however many routes
use it. Work is split where it is cheapest to refuse bad input:

* HTTP process (:meth:`FamilyAPI.prepare`): pydantic validation, model lookup, reading the
  image bytes and checking the image header. Errors answer at once and never reach a worker.
* worker (:meth:`FamilyAPI.predict`): pixel decoding and the model. Each request's failure is
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
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import litserve as ls
import torch
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel

from apis.config import ServerConfig
from apis.core.errors import APIError
from apis.core.image_ids import content_id
from apis.core.images import decode_image, probe_image
from apis.core.logs import REQUEST_ID, configure_logging
from apis.core.precision import resolve_dtype
from apis.core.process import die_with_parent, reuse_freed_memory
from apis.core.registry import Key, ModelRegistry, canonical
from apis.core.replies import Reply
from apis.core.settings import ModelEntry
from apis.core.weights import hub_file, is_hf_uri
from apis.http.inputs import IMAGE_FIELDS, ImageInput, read_image_bytes
from apis.http.responses import error_response, reply_response
from apis.litserve_internals import FamilySpecBase, WorkerLoop
from apis.transport.dispatch import Dispatcher

log = logging.getLogger("visionserve")

#: Threads that read and check image inputs (base64, URL, file; header probe). Pillow parses some
#: headers in Python, so a crafted file costs its thread, never the event loop (/health and every
#: other request). Bounded: more image requests than this wait for a free thread.
PREPARE_THREADS = 8


@dataclass(frozen=True)
class Route:
    op: str
    request: type[BaseModel]
    response: type[BaseModel]
    summary: str


@dataclass
class Job:
    """One request as it travels to a worker: validated fields, the model's id, raw image bytes,
    and on caching routes the image_id (apis/core/image_ids.py), which a request may send alone."""

    op: str
    model_id: str
    params: dict[str, Any]
    image_bytes: bytes | None = None
    image: Image.Image | None = field(default=None, repr=False)
    request_id: str = "-"  # the worker's log lines name it (apis/http/metrics.py)
    image_id: str | None = None


class FamilySpec(FamilySpecBase):
    """Registers a family's POST routes and its ``GET /<family>/health``; requests go to the
    family's workers through its :class:`~apis.transport.dispatch.Dispatcher`."""

    def __init__(self, api: FamilyAPI):
        super().__init__(api.family)
        self._api = api
        self.dispatcher: Dispatcher | None = None
        self.address: str | None = None  # what a worker connects to
        self._preparing: ThreadPoolExecutor | None = None  # made in the HTTP process

    def __getstate__(self):
        # Endpoints and the dispatcher (sockets, requests in flight) belong to the HTTP process;
        # a worker, also one restarted while requests wait, needs only the address.
        state = super().__getstate__()
        state["dispatcher"] = None
        state["_preparing"] = None
        return state

    def pre_setup(self, lit_api: FamilyAPI):
        # a worker takes its queue a batch at a time: one batch more than the least busy worker
        # delays a request by one batch, less than encoding its image again elsewhere
        self.dispatcher = Dispatcher(lit_api.family, slack=lit_api.max_batch_size)
        self.address = self.dispatcher.address
        for route in lit_api.routes:
            self.add_endpoint(f"{self.api_path}/{route.op}", self._endpoint(route), ["POST"])
        self.add_endpoint(f"{self.api_path}/health", self.health, ["GET", "HEAD"])
        self._preparing = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix=f"{lit_api.family}-prepare")

    def _endpoint(self, route: Route) -> Callable:
        async def endpoint(request):
            try:
                if isinstance(request, ImageInput) or route.op == "embed":
                    # base64 decoding, URL or disk I/O and the header probe, off the event loop
                    loop = asyncio.get_running_loop()
                    ctx = contextvars.copy_context()  # the request id, for log lines of the preparing thread
                    job = await loop.run_in_executor(
                        self._preparing, ctx.run, self._api.prepare, route.op, request
                    )
                else:
                    job = self._api.prepare(route.op, request)
            except APIError as e:
                return error_response(e)
            return reply_response(await self.submit(job))

        endpoint.__signature__ = inspect.Signature(
            [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=route.request)],
            return_annotation=route.response,
        )
        endpoint.__name__ = f"{self._api.family}_{route.op}"
        endpoint.__doc__ = route.summary
        return endpoint

    async def submit(self, job: Job) -> Reply:
        """A worker's answer to a prepared job (also what apis/openai_routes.py sends)."""
        job.request_id = REQUEST_ID.get()
        affinity = self._api.affinity(job)
        # a request with only an image_id can be answered only where that image is cached
        stay = job.image_id is not None and job.image_bytes is None
        reply = await self.dispatcher.submit(job, affinity, stay=stay)
        if reply.stats is not None:
            key, snapshot = reply.stats
            self._api.live_stats[key] = snapshot
        return reply

    async def health(self) -> JSONResponse:
        """Open readiness of this family's workers (what the seed clients poll)."""
        states = self.worker_states(self._api.family)
        ready = sum(states)
        ok = bool(states) and ready == len(states)
        body = {
            "status": "ok" if ok else "starting",
            "family": self._api.family,
            "workers_ready": ready,
            "workers": len(states),
        }
        return JSONResponse(body, status_code=200 if ok else 503)


class FamilyAPI(ls.LitAPI):
    """Base LitAPI of a model family. Subclasses set the class attributes and implement
    :meth:`load_model` and one ``op_<name>(model, jobs) -> list[dict | APIError]`` per route."""

    family: str
    routes: tuple[Route, ...]
    model_fields: tuple[str, ...]
    model_key: Callable[..., Key] = staticmethod(canonical)
    model_fill_defaults: bool = True  # see ModelRegistry.resolve
    cached_ops: frozenset[str] = frozenset()  # routes whose workers cache the encoded image

    def __init__(self, cfg: ServerConfig, dtype: str = "auto", log_level: str = "info"):
        fam = cfg.families()[self.family]
        super().__init__(
            max_batch_size=fam.max_batch_size,
            batch_timeout=fam.batch_timeout,
            spec=FamilySpec(self),
            loop=WorkerLoop(),
        )
        self.cfg = cfg
        self.fam = fam
        self.dtype_name = dtype
        self.log_level = log_level
        self.registry = ModelRegistry(
            self.family,
            fam.models,
            self.model_fields,
            key=self.model_key,
            fill_defaults=self.model_fill_defaults,
        )
        self.stats: Any = None  # shared dict, set by the server before workers start
        self.live_stats: dict[str, dict] = {}  # HTTP process: counters that came with answers

    # ------------------------------------------------------------------ HTTP process
    def prepare(self, op: str, request: BaseModel) -> Job:
        """Validate what needs the config and read the image bytes; raises APIError."""
        entry = self.registry.resolve(*(getattr(request, f, None) for f in self.model_fields))
        self.check(op, request)
        image, image_id = None, getattr(request, "image_id", None)
        if isinstance(request, ImageInput) and image_id is None:
            image = read_image_bytes(request, self.cfg)
            self.check_image(op, request, probe_image(image, self.cfg.limits))
            if op in self.cached_ops:
                image_id = content_id(image)
        params = request.model_dump(exclude={*IMAGE_FIELDS, "image_id", *self.model_fields})
        model_id = self.registry.id_of(entry)
        return Job(op=op, model_id=model_id, params=params, image_bytes=image, image_id=image_id)

    def affinity(self, job: Job) -> Hashable | None:
        """For a route that caches encoded images, the key that sends every request on one image
        for this model to the same worker (:class:`~apis.transport.dispatch.Dispatcher`): its image_id,
        whether the request sent the image or only the id."""
        if job.op not in self.cached_ops or job.image_id is None or not self.fam.route_by_image:
            return None
        return job.model_id, job.image_id

    def check(self, op: str, request: BaseModel) -> None:
        """Family-specific checks that pydantic cannot express; raise APIError."""

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

    def check_image(self, op: str, request: BaseModel, size: tuple[int, int]) -> None:
        """Checks that need the image's (width, height), before it is decoded; raise APIError."""

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

    def decode_request(self, request: Job) -> Job | APIError:
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
        items = x if self.max_batch_size > 1 else [x]
        results: list[Any] = list(items)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if isinstance(item, Job):
                groups[(item.op, item.model_id)].append(i)
        for (op, model_id), idx in groups.items():
            self._batches[op][len(idx)] += 1
            for i, out in zip(idx, self._run(op, model_id, [items[i] for i in idx]), strict=True):
                results[i] = out
        for i, item in enumerate(items):
            op = item.op if isinstance(item, Job) else "decode"
            res = results[i]
            self._requests[op][
                "ok"
                if not isinstance(res, APIError)
                else ("server_error" if res.status >= 500 else "client_error")
            ] += 1
        return results if self.max_batch_size > 1 else results[0]

    def _run(self, op: str, model_id: str, jobs: list[Job]) -> list:
        handler = getattr(self, f"op_{op}")
        try:
            model = self.model(self.registry.by_id(model_id))
            return handler(model, jobs)
        except APIError as e:
            return [e] * len(jobs)
        except Exception:
            if len(jobs) > 1:  # find the culprit: run each request on its own
                return [out for job in jobs for out in self._run(op, model_id, [job])]
            log.exception("%s/%s failed", self.family, op)
            return [
                APIError(
                    500,
                    f"internal error while running {self.family}/{op} (details are in the server log)",
                    code="internal_error",
                )
            ]

    def grouped(
        self,
        op: str,
        jobs: list[Job],
        prepare: Callable[[Job], Any],
        key: Callable[[Any], Hashable],
        forward: Callable[[list[Any]], Sequence[Any]],
        finish: Callable[[Job, Any, Any], dict],
    ) -> list:
        """Run the model once per group of requests whose prepared inputs share ``key``.

        ``prepare`` and ``finish`` run per request, and an APIError there answers only that
        request; ``forward`` takes a group's prepared inputs and returns one output each.
        """
        out: list[Any] = [None] * len(jobs)
        groups: dict[Hashable, list[tuple[int, Any]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            try:
                item = prepare(job)
            except APIError as e:
                out[i] = e
                continue
            groups[key(item)].append((i, item))
        for members in groups.values():
            self._forwards[op][len(members)] += 1
            results = forward([item for _, item in members])
            for (i, item), res in zip(members, results, strict=True):
                try:
                    out[i] = finish(jobs[i], item, res)
                except APIError as e:
                    out[i] = e
        return out

    def encode_response(self, output: dict | APIError | Reply) -> Reply:
        """The answer rendered here, in the worker (apis/core/replies.py)."""
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
            "models_loaded": sorted(self._models),
            "load_seconds": dict(self._load_seconds),
            "requests": {op: dict(c) for op, c in self._requests.items()},
            "batch_sizes": _histograms(self._batches),
            "forward_batch_sizes": _histograms(self._forwards),
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


def _histograms(counters: dict[str, Counter]) -> dict[str, dict[str, int]]:
    return {op: {str(k): v for k, v in sorted(c.items())} for op, c in counters.items()}
