"""Assembles the one LitServer: family APIs, auth and size middleware, errors, ``/info``.

Worker processes are placed by LitServe (``workers_per_device`` on every device) and restarted
by its monitor when they die. Requests reach them through each family's dispatcher
(apis/dispatch.py), which lives on the event loop of the one HTTP server, a thread of this
process (``api_server_worker_type='thread'``). There is one HTTP server: LitServe 0.2.19's
thread servers share each family's spec and its answer-queue id, which ends up the last
server's (``_start_server``), and the work that needs cores is in the model workers anyway.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import litserve as ls
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from litserve.utils import WorkerSetupStatus
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.gzip import GZipMiddleware

from . import __version__
from .config import WORKER_ENV, ServerConfig
from .drain import DrainGate, DrainState
from .errors import APIError, install_error_handlers
from .family import LOG_FORMAT_ENV, FamilyAPI
from .middleware import BearerAuth, BodyLimit
from .observability import Metrics, RequestContext, adopt_litserve_logger
from .openai_routes import install_openai_routes
from .playground import install_playground, is_playground
from .protocol import http_protocol
from .routing import JsonBodyRoute

log = logging.getLogger("visionserve")

_FAMILY_CLASSES = {
    "clip": ("clip_api", "ClipAPI"),
    "dino": ("dino_api", "DinoAPI"),
    "sam2": ("sam2_api", "Sam2API"),
    "sam3": ("sam3_api", "Sam3API"),
    "rmbg": ("rmbg_api", "RmbgAPI"),
}


class _Families(Mapping[str, type[FamilyAPI]]):
    """Family name to its LitAPI class, imported on first use: a server (or a --download run)
    imports the model libraries of the families it serves only, a few CPU-seconds each."""

    def __getitem__(self, name: str) -> type[FamilyAPI]:
        module, cls = _FAMILY_CLASSES[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_FAMILY_CLASSES)

    def __len__(self) -> int:
        return len(_FAMILY_CLASSES)


FAMILIES: Mapping[str, type[FamilyAPI]] = _Families()
_DOC_PATHS = {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


@dataclass
class Options:
    """Process-level choices from the command line (the YAML holds the model-level ones)."""

    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    workers_per_device: int = 1
    dtype: str = "auto"
    api_keys: list[str] | None = field(default_factory=list)  # None = auth disabled
    queue_timeout: float = 300.0
    log_level: str = "info"
    unavailable: dict[str, str] = field(default_factory=dict)  # optional families left out, and why


class VisionServer(ls.LitServer):
    """LitServer plus a shared stats dict, all-workers-ready startup and a clean stop."""

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        self.stats = manager.dict()
        for api in self.litapi_connector:
            api.stats = self.stats
        return manager

    http_protocol: type | None = None  # uvicorn's protocol class (apis/protocol.py)

    def run(self, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
        """LitServer.run with what the dispatchers need: one HTTP server, a thread of this process.
        Keyword arguments reach uvicorn.Config, so does the guarded HTTP protocol.

        LitServe 0.2.19 listens only on 0.0.0.0, 127.0.0.1 or ::, so the socket is bound here, on
        any address or host name, and handed to uvicorn as a file descriptor (before any worker
        starts: a taken port fails at once)."""
        for name, value in WORKER_ENV.items():  # read by libraries as workers import them
            os.environ.setdefault(name, value)
        if self.http_protocol is not None:
            kwargs.setdefault("http", self.http_protocol)
        self.listener = listen_socket(host, port)
        super().run(
            host="0.0.0.0",  # only passes LitServe's check: uvicorn uses fd
            port=port,
            fd=self.listener.fileno(),
            num_api_servers=1,
            api_server_worker_type="thread",
            generate_client_file=False,
            **kwargs,
        )

    def _register_spec_endpoints(self, lit_api: FamilyAPI) -> None:
        """The family's routes, with bodies parsed by :class:`~apis.routing.JsonBodyRoute`.
        LitServe's auth dependency is left out: BearerAuth guards every route before this."""
        lit_api.spec._server = self
        for path, endpoint, methods in lit_api.spec.endpoints:
            self.app.router.add_api_route(path, endpoint, methods=methods, route_class_override=JsonBodyRoute)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        """LitServe's start-up, then each family's dispatcher on the HTTP server's event loop."""
        async with super().lifespan(app):
            if os.environ.get(LOG_FORMAT_ENV) == "json":  # LitServe's run() set its own handler again
                adopt_litserve_logger()
            for api in self.litapi_connector:
                await api.spec.dispatcher.start(api.request_timeout)
            yield

    def close_dispatchers(self) -> None:
        """Remove the worker sockets (app.py calls it on every way out)."""
        for api in self.litapi_connector:
            if api.spec.dispatcher is not None:
                api.spec.dispatcher.close()

    def verify_worker_status(self):
        """Serve only once EVERY worker loaded its models; fail fast (no restart loop) if one cannot."""
        expected = sum(len(self._inference_workers_config_for_api(a.api_path)) for a in self.litapi_connector)
        while True:
            states = list(self.workers_setup_status.values())
            if any(s == WorkerSetupStatus.ERROR for s in states) or any(
                not p.is_alive() for p in self.inference_workers
            ):
                raise RuntimeError("a model worker failed to start (see its error above)")
            if len(states) == expected and all(s == WorkerSetupStatus.READY for s in states):
                return
            time.sleep(0.1)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal"):
        # Stop the monitor first, or it restarts the workers we are about to terminate. From a new
        # thread: Ctrl-C/SIGTERM may have cut this thread's manager connection mid-call.
        setter = threading.Thread(target=self._shutdown_event.set, daemon=True)
        setter.start()
        setter.join(timeout=2)
        # HTTP server threads cannot be terminated; app.py exits the process once workers are gone.
        processes = {k: w for k, w in uvicorn_workers.items() if not isinstance(w, threading.Thread)}
        super()._perform_graceful_shutdown(manager, processes, shutdown_reason)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` (an IPv4 or IPv6 address or a host name) and ``port``, as
    uvicorn binds one; RuntimeError saying which address failed and why."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise RuntimeError(f"cannot listen on {host} port {port}: {e}") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # uvicorn wraps a socket given by fd as a Unix socket, so nothing sets TCP_NODELAY on the
    # connections; Linux copies it from the listening socket to each accepted one
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host} port {port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


def build_server(cfg: ServerConfig, opts: Options) -> VisionServer:
    families = cfg.families()
    if not families:
        raise ValueError("no model family is enabled: configure at least one (see configs/demo.yaml)")
    apis = [FAMILIES[name](cfg, dtype=opts.dtype, log_level=opts.log_level) for name in families]
    wpd = {f"/{name}": fam.workers_per_device or opts.workers_per_device for name, fam in families.items()}

    def is_open(path: str) -> bool:
        return (
            path == "/health"
            or (path.endswith("/health") and (path[1:-7] in families or path[1:-7] in opts.unavailable))
            or (cfg.public_docs and path in _DOC_PATHS)
            or (cfg.public_metrics and path == "/metrics")
            or is_playground(path)
        )

    metrics = Metrics(apis, opts.unavailable)
    middlewares = [
        (BodyLimit, {"max_bytes": cfg.limits.max_body_bytes, "timeout_s": cfg.limits.body_timeout_s})
    ]
    if opts.api_keys is not None:
        middlewares.append((BearerAuth, {"keys": opts.api_keys, "is_open": is_open}))
    drain = DrainState()
    middlewares.append((DrainGate, {"state": drain}))  # outside auth: sees every request
    middlewares.append((RequestContext, {"metrics": metrics}))  # added after the drain gate: outermost
    server = VisionServer(
        apis,
        accelerator=opts.accelerator,
        devices=opts.devices,
        workers_per_device=wpd,
        timeout=opts.queue_timeout,
        middlewares=middlewares,
        restart_workers=True,
    )
    # LitServe adds gzip at level 9; on multi-MB base64 tensors it costs more CPU than it saves bytes.
    server.app.user_middleware = [m for m in server.app.user_middleware if m.cls is not GZipMiddleware]
    server.app.title, server.app.version = "visionserve", __version__
    server.http_protocol = http_protocol(cfg.limits)
    # '/route/' must not answer 307 with a Location built from the request's Host header
    server.app.router.redirect_slashes = False
    for route in server.app.router.routes:
        if getattr(route, "path", None) == "/health":  # load balancers and uptime checks send HEAD
            route.methods.add("HEAD")
    install_error_handlers(server.app)
    install_playground(server.app)
    _replace_info_route(server, cfg, opts, apis)
    install_openai_routes(server.app, cfg, apis)
    _add_observability_routes(server, metrics, opts.unavailable)
    server.drain = drain
    return server


def _add_observability_routes(server: VisionServer, metrics: Metrics, unavailable: dict[str, str]) -> None:
    """``/metrics``; ``/health`` naming the families left out; and, for each of those, its
    routes answering 503 with the reason (not 404, which would hide why)."""

    @server.app.get("/metrics", summary="Prometheus metrics (text exposition format).")
    async def metrics_route(_: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if not unavailable:
        return
    health = next(r for r in server.app.router.routes if getattr(r, "path", None) == "/health")
    litserve_health = health.endpoint
    missing = ", ".join(sorted(unavailable))

    async def health_naming_missing(request: Request) -> Response:
        answer = await litserve_health(request)
        if answer.status_code != 200:
            return answer
        return Response(
            f"ok; not served (weights unavailable, see /info): {missing}", media_type="text/plain"
        )

    server.app.router.routes.remove(health)
    server.app.add_api_route("/health", health_naming_missing, methods=["GET"])

    for name, reason in unavailable.items():
        family_health, refuse = _unavailable_endpoints(name, reason)
        server.app.add_api_route(f"/{name}/health", family_health, methods=["GET"], include_in_schema=False)
        for route in FAMILIES[name].routes:
            server.app.add_api_route(f"/{name}/{route.op}", refuse, methods=["POST"], include_in_schema=False)


def _unavailable_endpoints(name: str, reason: str):
    """``/<family>/health`` and the routes of a family left out: 503 with the reason."""
    body = {"status": "unavailable", "family": name, "reason": reason}
    error = APIError(501, f"{name} is not served by this server: {reason}", code="family_unavailable")

    async def family_health(_: Request) -> JSONResponse:
        return JSONResponse(body, status_code=503)

    async def refuse(_: Request) -> Response:
        return error.response()

    return family_health, refuse


def _replace_info_route(
    server: VisionServer, cfg: ServerConfig, opts: Options, apis: list[FamilyAPI]
) -> None:
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/info"]

    @server.app.get("/info", summary="Models, devices, workers, weights source and request counters.")
    async def info(_: Request) -> JSONResponse:
        stats = {k: v for api in apis for k, v in api.worker_stats().items()}
        return JSONResponse(describe(cfg, opts, apis, server.devices, stats))


def describe(cfg: ServerConfig, opts: Options, apis: list[FamilyAPI], devices, stats: dict) -> dict:
    families = {}
    for api in apis:
        workers = sorted((v for v in stats.values() if v["family"] == api.family), key=lambda v: v["worker"])
        totals: dict[str, dict[str, int]] = {}
        for w in workers:
            for op, counts in w["requests"].items():
                for k, n in counts.items():
                    totals.setdefault(op, {}).setdefault(k, 0)
                    totals[op][k] += n
        families[api.family] = {
            "routes": [f"/{api.family}/{r.op}" for r in api.routes],
            "models": [
                {"id": api.registry.id_of(e), "weights": e.weights_source, "random_weights": e.is_random}
                for e in api.registry.entries
            ],
            "default_model": api.registry.id_of(api.registry.default),
            "load": api.fam.load,
            "max_batch_size": api.fam.max_batch_size,
            "batch_timeout_s": api.fam.batch_timeout,
            "requests": totals,
            "workers": workers,
        }
    return {
        "name": "visionserve",
        "version": __version__,
        "random_weights": any(e.is_random for a in apis for e in a.registry.entries),
        "auth": "disabled" if opts.api_keys is None else "bearer",
        "devices": [d if isinstance(d, str) else list(d) for d in devices],
        "dtype": opts.dtype,
        "families": families,
        "unavailable": {name: {"available": False, "reason": why} for name, why in opts.unavailable.items()},
        "limits": cfg.limits.model_dump(),
        "inputs": {"image_url": cfg.inputs.url.enabled, "image_path": bool(cfg.inputs.path.roots)},
    }


def random_weight_models(cfg: ServerConfig) -> list[str]:
    return [f"{name}:{m.name}" for name, fam in cfg.families().items() for m in fam.models if m.is_random]
