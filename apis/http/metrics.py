"""Request ids and Prometheus metrics.

* Every request has an id: the client's ``X-Request-ID`` when it is a short run of safe
  characters, else a generated one. It is echoed on the answer and set in
  :data:`apis.core.logs.REQUEST_ID` for the log lines.
* ``GET /metrics`` renders Prometheus text from the HTTP process alone. Request counts and
  latencies are measured here; the model workers' counters (batch sizes, cache hits, load
  times) already come back with every answer for ``/info`` and are turned into metrics when
  scraped, so no worker writes metric files and nothing needs cleaning after a restart (a
  restarted worker's counters start again from zero under its own ``worker`` label, which
  Prometheus reads as a counter reset).
* Each request's family is the one whose workers answer it: the path's first segment, or, for
  ``/v1/*``, the family the handler submits to (:data:`CURRENT` carries the request's
  :class:`Exchange` to it). The answer carries the worker's queue-wait and compute times.
* ``metrics_port`` serves the same text on a second listener with no key, so that Prometheus in
  a cluster scrapes it without holding an API key (docs/observability.md says why).
"""

from __future__ import annotations

import asyncio
import logging
import platform
import re
import socket
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from importlib import metadata
from typing import TYPE_CHECKING

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from apis import __version__
from apis.core.logs import REQUEST_ID
from apis.core.replies import Reply

if TYPE_CHECKING:
    from apis.family import FamilyAPI

log = logging.getLogger("visionserve")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def request_id_from(header: bytes | None) -> str:
    """The client's id if it is 1-128 safe characters (no spaces, quotes or control bytes that
    could forge log lines or headers), else a new random one."""
    if header is not None:
        try:
            text = header.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if _SAFE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class Exchange:
    """One request as the metrics see it: the family that serves it, learnt from the path or,
    for ``/v1/*``, when its handler submits a job, and the answers' worker timings."""

    def __init__(self, metrics: Metrics, family: str | None):
        self.metrics = metrics
        self.family: str | None = None
        self.timings: list[tuple[float | None, float | None]] = []
        if family is not None:
            self.serves(family)

    def serves(self, family: str) -> None:
        """The request is (also) this family's: it counts in its in-flight gauge from now on."""
        if self.family is None:
            self.family = family
            self.metrics.in_flight.labels(family).inc()

    def answered(self, reply: Reply) -> None:
        self.timings.append((reply.queue_s, reply.compute_s))


#: The request being handled: the handler of a route tells it which family answers it.
CURRENT: ContextVar[Exchange | None] = ContextVar("visionserve_exchange", default=None)


class Metrics:
    """The HTTP process's metrics and the collector that reads the workers' counters."""

    def __init__(self, apis: list[FamilyAPI], unavailable: Iterable[str] = ()):
        self.registry = CollectorRegistry(auto_describe=True)
        by_route = ["family", "route", "method", "status"]
        self.requests = Counter(
            "visionserve_requests",
            "HTTP requests answered, by family, route template, method and status.",
            by_route,
            registry=self.registry,
        )
        self.latency = Histogram(
            "visionserve_request_duration_seconds",
            "Time from request to the last byte of the answer, by family, route, method and status.",
            by_route,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "visionserve_request_failures",
            "Requests answered 4xx or 5xx, or left by their client, by family, route and reason.",
            ["family", "route", "reason"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "visionserve_queue_wait_seconds",
            "Time a request waited before a model worker took it into a batch, by family and route.",
            ["family", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "visionserve_compute_seconds",
            "Time the batch that held the request took in its worker (decode, model, encode), per route.",
            ["family", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "visionserve_requests_in_flight",
            "Requests of a family received and not yet answered (validation, queue and model).",
            ["family"],
            registry=self.registry,
        )
        build = Gauge(
            "visionserve_build_info",
            "Always 1: the versions this server runs.",
            ["version", "python", "torch", "litserve"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version(), _version("torch"), _version("litserve")).set(1)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.families = {api.family for api in apis}
        for name in self.families:
            self.in_flight.labels(name)
        self.registry.register(_WorkerCollector(apis, set(unavailable)))

    def family_of(self, path: str) -> str | None:
        name = path.split("/", 2)[1] if path.count("/") >= 2 else None
        return name if name in self.families else None

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _version(distribution: str) -> str:
    """An installed package's version, read from its metadata (torch is never imported here)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


class _WorkerCollector(Collector):
    """Metrics read at scrape time from the dispatchers and the workers' latest counters."""

    def __init__(self, apis: list[FamilyAPI], unavailable: set[str]):
        self.apis = apis
        self.unavailable = unavailable

    def collect(self):
        available = GaugeMetricFamily(
            "visionserve_family_available",
            "1 when the family is served, 0 when it was left out (optional, weights unavailable).",
            labels=["family"],
        )
        queue = GaugeMetricFamily(
            "visionserve_queue_depth",
            "Requests of a family waiting for a model worker (sent or to be sent, not yet in a batch).",
            labels=["family"],
        )
        workers = GaugeMetricFamily(
            "visionserve_workers_connected",
            "Model workers of a family ready to take requests.",
            labels=["family"],
        )
        restarts = _counter(
            "visionserve_worker_restarts", "Model workers that came back after dying.", ["family"]
        )
        batch = HistogramMetricFamily(
            "visionserve_batch_size",
            "Requests run together by one predict call, per family, route and worker.",
            labels=["family", "op", "worker"],
        )
        forward = HistogramMetricFamily(
            "visionserve_forward_batch_size",
            "Inputs in one model forward pass, per family, route and worker.",
            labels=["family", "op", "worker"],
        )
        hits = _counter(
            "visionserve_cache_hits", "Image-embedding cache hits.", ["family", "model", "worker"]
        )
        misses = _counter(
            "visionserve_cache_misses", "Image-embedding cache misses.", ["family", "model", "worker"]
        )
        load = GaugeMetricFamily(
            "visionserve_model_load_seconds",
            "Seconds a worker took to build and load a model (weights already on disk).",
            labels=["family", "model", "worker"],
        )
        gpu = GaugeMetricFamily(
            "visionserve_gpu_memory_bytes",
            "GPU memory held by a worker's torch allocator (allocated, reserved, peak_allocated); CUDA only.",
            labels=["family", "worker", "device", "kind"],
        )
        sessions = GaugeMetricFamily(
            "visionserve_video_sessions",
            "Video tracking sessions a worker holds.",
            labels=["family", "worker"],
        )
        session_bytes = GaugeMetricFamily(
            "visionserve_video_session_memory_bytes",
            "Memory the video sessions of a worker hold (frames and tracking state).",
            labels=["family", "worker"],
        )
        evicted = _counter(
            "visionserve_video_sessions_evicted",
            "Video sessions closed by the worker: lru (to make room) or idle (past video.idle_ttl_s).",
            ["family", "worker", "reason"],
        )
        for name in sorted(self.unavailable):
            available.add_metric([name], 0)
        for api in self.apis:
            fam = api.family
            available.add_metric([fam], 1)
            dispatcher = api.spec.dispatcher
            if dispatcher is not None:
                queue.add_metric([fam], dispatcher.queue_depth)
                workers.add_metric([fam], dispatcher.connected)
                restarts.add_metric([fam], dispatcher.restarts)
            for snap in api.worker_stats().values():
                w = str(snap["worker"])
                for op, sizes in snap.get("batch_sizes", {}).items():
                    _add_histogram(batch, [fam, op, w], sizes)
                for op, sizes in snap.get("forward_batch_sizes", {}).items():
                    _add_histogram(forward, [fam, op, w], sizes)
                for model, stats in snap.get("embedding_cache", {}).items():
                    hits.add_metric([fam, model, w], stats["hits"])
                    misses.add_metric([fam, model, w], stats["misses"])
                for model, seconds in snap.get("load_seconds", {}).items():
                    load.add_metric([fam, model, w], seconds)
                for kind, nbytes in snap.get("gpu_memory", {}).items():
                    gpu.add_metric([fam, w, snap["device"], kind], nbytes)
                video = snap.get("video_sessions")
                if video is not None:
                    sessions.add_metric([fam, w], video["count"])
                    session_bytes.add_metric([fam, w], video["memory_bytes"])
                    for reason, n in video["evictions"].items():
                        evicted.add_metric([fam, w, reason], n)
        yield from (available, queue, workers, restarts, batch, forward, hits, misses, load, gpu)
        yield from (sessions, session_bytes, evicted)


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _add_histogram(metric: HistogramMetricFamily, labels: list[str], sizes: dict[str, int]) -> None:
    """A histogram from exact counts per batch size (``{"3": 10, ...}``)."""
    counts = {int(k): v for k, v in sizes.items()}
    buckets = [(str(float(le)), sum(v for k, v in counts.items() if k <= le)) for le in BATCH_BUCKETS]
    buckets.append(("+Inf", sum(counts.values())))
    metric.add_metric(labels, buckets, sum_value=float(sum(k * v for k, v in counts.items())))


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def failure_reason(status: int, body: bytes) -> str:
    """Why a request failed: a server error's code (``worker_died``, ``queue_timeout``, ...),
    ``client_disconnected`` for 499 (the handler saw its client leave: apis/http/routing.py),
    ``client_error`` for any other 4xx (the status is in ``visionserve_requests_total``)."""
    if status == 499:
        return "client_disconnected"
    if status < 500:
        return "client_error"
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code = None
    return code if isinstance(code, str) and _SAFE_ID.fullmatch(code) else "server_error"


class RequestContext:
    """Outermost ASGI middleware: request id in and out, family, in-flight gauge, count,
    latency, failures and the worker timings of the answers."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id_from(_header(scope, b"x-request-id"))
        token = REQUEST_ID.set(rid)
        exchange = Exchange(self.metrics, self.metrics.family_of(scope.get("path", "")))
        exchange_token = CURRENT.set(exchange)
        start = time.perf_counter()
        status = None
        error_body = bytearray()  # the start of an error's body: its code is the failure reason

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())],
                }
            elif status is not None and status >= 500 and len(error_body) < 4096:
                error_body.extend(message.get("body", b""))
            await send(message)

        unanswered = "client_disconnected"  # the reason when no answer started
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            unanswered = "internal_error"
            raise
        finally:
            reason = unanswered if status is None else None
            self._count(scope, exchange, status, reason, bytes(error_body), time.perf_counter() - start)
            CURRENT.reset(exchange_token)
            REQUEST_ID.reset(token)

    def _count(
        self,
        scope,
        exchange: Exchange,
        status: int | None,
        unanswered: str | None,
        body: bytes,
        seconds: float,
    ) -> None:
        m = self.metrics
        family = exchange.family or ""
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        # no answer: 499 (nginx's "client closed request") when the client left, else 500
        shown = str(status or (499 if unanswered == "client_disconnected" else 500))
        m.requests.labels(family, route, scope.get("method", ""), shown).inc()
        m.latency.labels(family, route, scope.get("method", ""), shown).observe(seconds)
        if unanswered is not None:
            m.failures.labels(family, route, unanswered).inc()
        elif status >= 400:
            m.failures.labels(family, route, failure_reason(status, body)).inc()
        for queue_s, compute_s in exchange.timings:
            if queue_s is not None:
                m.queue_wait.labels(family, route).observe(queue_s)
            if compute_s is not None:
                m.compute.labels(family, route).observe(compute_s)
        if exchange.family is not None:
            m.in_flight.labels(exchange.family).dec()


class MetricsListener:
    """``GET /metrics`` with no key on a port of its own, on the server's event loop.

    The API port keeps every route behind the key; this port carries nothing but the metrics, so
    a NetworkPolicy can open it to Prometheus alone and no Ingress ever routes to it. It speaks
    just enough HTTP/1.1 for a scraper: one request per connection, then close.
    """

    def __init__(self, metrics: Metrics, sock: socket.socket):
        self.metrics = metrics
        self.sock = sock  # bound before any worker starts: a taken port fails start-up at once
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self.sock)
        host, port = self.sock.getsockname()[:2]
        log.info("metrics (no key) on http://%s:%d/metrics", host, port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target = (head.split(b"\r\n", 1)[0].split(b" ") + [b"", b""])[:2]
            if target.split(b"?", 1)[0] != b"/metrics":
                status, body, kind = (
                    b"404 Not Found",
                    b"only /metrics is served on this port\n",
                    b"text/plain",
                )
            elif method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
            else:
                status, body, kind = b"200 OK", self.metrics.render(), CONTENT_TYPE_LATEST.encode()
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, kind, len(body))
            )
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that sent no whole request head, or left: nothing to answer
        finally:
            writer.close()
