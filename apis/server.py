"""Assembles the one LitServer: family APIs, auth and size middleware, errors, ``/info``,
``/metrics``. The path of a request through it is drawn in docs/design.md."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from apis import __version__
from apis.config import WORKER_ENV, ServerConfig
from apis.core.errors import APIError
from apis.families import FAMILIES
from apis.family import FamilyAPI
from apis.http.errors import install_error_handlers
from apis.http.metrics import Metrics, MetricsListener, RequestContext
from apis.http.middleware import BearerAuth, BodyLimit, DrainGate, DrainState
from apis.http.playground import install_playground, is_playground
from apis.http.routing import error_response
from apis.litserve_internals import VisionServer, listen_socket
from apis.openai_routes import install_openai_routes
from apis.uvicorn_internals import http_protocol

log = logging.getLogger("visionserve")

_DOC_PATHS = {"/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


@dataclass
class CommandLine:
    """Process-level choices from the command line (the YAML holds the model-level ones)."""

    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    workers_per_device: int = 1
    dtype: str = "auto"
    api_keys: list[str] | None = field(default_factory=list)  # None = auth disabled
    queue_timeout: float = 300.0
    log_level: str = "info"
    host: str = "127.0.0.1"  # where the metrics port listens too
    unavailable: dict[str, str] = field(default_factory=dict)  # optional families left out, and why


def close_dispatchers(server: VisionServer) -> None:
    """Remove the worker sockets (app.py calls it on every way out)."""
    for api in server.litapi_connector:
        if api.spec.dispatcher is not None:
            api.spec.dispatcher.close()


def build_server(cfg: ServerConfig, opts: CommandLine) -> VisionServer:
    families = cfg.families()
    if not families:
        raise ValueError("no model family is enabled: configure at least one (see configs/demo.yaml)")
    apis = [FAMILIES[name].api_class()(cfg, dtype=opts.dtype, log_level=opts.log_level) for name in families]
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
    server.worker_env = WORKER_ENV

    listener = None
    if cfg.metrics_port is not None:
        listener = MetricsListener(metrics, listen_socket(opts.host, cfg.metrics_port))

    async def start_dispatchers() -> None:
        for api in apis:
            await api.spec.dispatcher.start(api.request_timeout)
        if listener is not None:
            await listener.start()

    server.on_start = start_dispatchers
    server.app.title, server.app.version = "visionserve", __version__
    server.http_protocol = http_protocol(cfg.limits)
    # '/route/' must not answer 307 with a Location built from the request's Host header
    server.app.router.redirect_slashes = False
    for route in server.app.router.routes:
        if getattr(route, "path", None) == "/health":  # load balancers and uptime checks send HEAD
            route.methods.add("HEAD")
    install_error_handlers(server.app)
    if opts.api_keys is not None:
        _declare_bearer_auth(server.app, is_open)
    install_playground(server.app)
    _replace_info_route(server, cfg, opts, apis)
    install_openai_routes(server.app, cfg, apis)
    _add_observability_routes(server, metrics, opts.unavailable)
    server.drain = drain
    return server


def _declare_bearer_auth(app: FastAPI, is_open: Callable[[str], bool]) -> None:
    """The OpenAPI document names the bearer key (a ``bearerAuth`` scheme) on every operation
    that needs it, and none on the open ones, so Swagger UI's "Authorize" sends it."""
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make()  # FastAPI's, cached on the app: the additions below stay
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the server's API keys (--api-key, VISIONSERVE_API_KEYS).",
                }
            }
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation["security"] = [] if is_open(path) else [{"bearerAuth": []}]
        return app.openapi_schema

    app.openapi = openapi


def _add_observability_routes(server: VisionServer, metrics: Metrics, unavailable: dict[str, str]) -> None:
    """``/metrics``; ``/health`` naming the families left out; and, for each of those, its
    routes answering 501 with the reason (not 404, which would hide why)."""

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
        for route in FAMILIES[name].api_class().routes:
            server.app.add_api_route(
                f"/{name}/{route.name}", refuse, methods=["POST"], include_in_schema=False
            )


def _unavailable_endpoints(name: str, reason: str):
    """``/<family>/health`` (503) and the routes (501) of a family left out, with the reason."""
    body = {"status": "unavailable", "family": name, "reason": reason}
    error = APIError(501, f"{name} is not served by this server: {reason}", code="family_unavailable")

    async def family_health(_: Request) -> JSONResponse:
        return JSONResponse(body, status_code=503)

    async def refuse(_: Request) -> Response:
        return error_response(error)

    return family_health, refuse


def _replace_info_route(
    server: VisionServer, cfg: ServerConfig, opts: CommandLine, apis: list[FamilyAPI]
) -> None:
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/info"]

    @server.app.get("/info", summary="Models, devices, workers, weights source and request counters.")
    async def info(_: Request) -> JSONResponse:
        stats = {k: v for api in apis for k, v in api.worker_stats().items()}
        return JSONResponse(describe(cfg, opts, apis, server.devices, stats))


def describe(cfg: ServerConfig, opts: CommandLine, apis: list[FamilyAPI], devices, stats: dict) -> dict:
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
            "routes": [f"/{api.family}/{name}" for name in api.handlers],
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
