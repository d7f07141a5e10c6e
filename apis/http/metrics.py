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
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from apis.core.logs import REQUEST_ID

if TYPE_CHECKING:
    from apis.family import FamilyAPI

_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
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


class Metrics:
    """The HTTP process's metrics and the collector that reads the workers' counters."""

    def __init__(self, apis: list[FamilyAPI], unavailable: Iterable[str] = ()):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "visionserve_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "visionserve_request_duration_seconds",
            "Time from request to the last byte of the answer, by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "visionserve_requests_in_flight",
            "Requests of a family received and not yet answered (validation, queue and model).",
            ["family"],
            registry=self.registry,
        )
        self.families = {api.family for api in apis}
        for name in self.families:
            self.in_flight.labels(name)
        self.registry.register(_WorkerCollector(apis, set(unavailable)))

    def family_of(self, path: str) -> str | None:
        name = path.split("/", 2)[1] if path.count("/") >= 2 else None
        return name if name in self.families else None

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
                video = snap.get("video_sessions")
                if video is not None:
                    sessions.add_metric([fam, w], video["count"])
                    session_bytes.add_metric([fam, w], video["memory_bytes"])
                    for reason, n in video["evictions"].items():
                        evicted.add_metric([fam, w, reason], n)
        yield from (available, queue, workers, restarts, batch, forward, hits, misses, load)
        yield from (sessions, session_bytes, evicted)


def _counter(name: str, doc: str, labels: list[str]):
    from prometheus_client.core import CounterMetricFamily

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


class RequestContext:
    """Outermost ASGI middleware: request id in and out, in-flight gauge, count and latency."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id_from(_header(scope, b"x-request-id"))
        token = REQUEST_ID.set(rid)
        family = self.metrics.family_of(scope.get("path", ""))
        gauge = self.metrics.in_flight.labels(family) if family else None
        if gauge is not None:
            gauge.inc()
        start = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            labels = (route, scope.get("method", ""), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
            if gauge is not None:
                gauge.dec()
            REQUEST_ID.reset(token)
