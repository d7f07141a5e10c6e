"""Every contact with LitServe's internals, checked against litserve :data:`LITSERVE_VERSION`.

LitServe places the model worker processes on the devices, restarts one that dies (its monitor
thread) and runs uvicorn. Requests travel over this project's transport (apis/transport/), so
LitServe's request queues, response queues and response poller are not created. What this
module overrides or reads, and why:

* ``LitServer.__init__``'s accelerator ``"auto"``: chosen here (``"cuda"`` where nvidia-smi
  sees a GPU, else ``"cpu"``, as LitServe decides on Linux), because LitServe's own choice
  imports torch into the HTTP process (to look for Apple's MPS).
* ``LitServer.__init__``'s gzip middleware (``_register_middleware``): removed.
* ``LitServer._init_manager``: only the manager dict of worker states, the shutdown event and a
  shared dict for worker counters; no request queues, no message transport; the manager process
  is spawned (LitServe forks it from the HTTP process, whose memory it then keeps mapped) and
  dies with the server.
* ``LitServer._get_request_queue`` / ``lifespan``: no queue to hand to a worker, no poller
  task; the lifespan starts each family's dispatcher on the HTTP server's event loop instead.
* ``LitServer.run``: one HTTP server thread, on a socket bound here (LitServe accepts only
  0.0.0.0, 127.0.0.1 or ::), with our uvicorn protocol class.
* ``LitServer._register_spec_endpoints``: body parsing by our route class, no auth dependency
  (BearerAuth middleware guards every route).
* ``LitServer.verify_worker_status``: serve once EVERY worker is ready, not the first.
* ``LitServer._perform_graceful_shutdown``: stop the monitor before terminating workers, and no
  transport to close.
* ``LitServer.workers_setup_status`` keys ``"{family}_{worker}"``: per-family readiness.
* ``LitServer.inference_workers``, ``litapi_connector``, ``_inference_workers_config_for_api``,
  ``transport_config.manager``, ``_shutdown_event``: the processes and the manager to stop.
* ``LitSpec`` (``_server``, ``add_endpoint``, ``endpoints``, ``setup``) and ``_BaseLoop.__call__``:
  a family's routes, and the worker's loop over our socket.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.managers import SyncManager
from typing import Any

import litserve as ls
from fastapi import FastAPI
from litserve.connector import check_cuda_with_nvidia_smi
from litserve.loops.base import _BaseLoop
from litserve.specs.base import LitSpec
from litserve.utils import WorkerSetupStatus
from starlette.middleware.gzip import GZipMiddleware

from apis.core.logs import LOG_FORMAT_ENV, adopt_litserve_logger, log
from apis.core.process import die_with_parent
from apis.http.errors import ERROR_RESPONSES
from apis.http.routing import JsonBodyRoute
from apis.transport.worker_loop import serve

#: The litserve release whose internals this module was checked against
#: (tests/unit/test_litserve_contract.py).
LITSERVE_VERSION = "0.2.19"


class VisionServer(ls.LitServer):
    """LitServer that places and restarts the workers and leaves the requests to our transport."""

    http_protocol: type | None = None  # uvicorn's protocol class (apis/uvicorn_internals.py)
    on_start: Any = None  # async callable run on the HTTP server's event loop before serving
    worker_env: dict[str, str] = {}

    def __init__(self, lit_api: Any, accelerator: str = "auto", **kwargs: Any):
        if accelerator == "auto":  # LitServe's "auto" imports torch here, in the HTTP process
            accelerator = "cuda" if check_cuda_with_nvidia_smi() > 0 else "cpu"
        super().__init__(lit_api, accelerator=accelerator, **kwargs)

    def _init_manager(self, num_api_servers: int) -> mp.managers.SyncManager:
        # mp.Manager(), except that the manager process dies with the server as the workers do
        # (a SIGKILLed server left it running, holding its memory), and is spawned: a fresh
        # interpreter holding three small shared objects, not a fork of the HTTP process
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(die_with_parent)
        self.transport_config.manager = manager
        self.workers_setup_status = manager.dict()
        self._shutdown_event = manager.Event()
        self._transport = None
        self.stats = manager.dict()
        for api in self.litapi_connector:
            api.stats = self.stats
        return manager

    def _register_middleware(self) -> None:
        # LitServe adds gzip at level 9: on multi-MB base64 tensors it costs more CPU than it saves
        self.middlewares = [
            m for m in self.middlewares if not (isinstance(m, tuple) and m[0] is GZipMiddleware)
        ]
        super()._register_middleware()

    def _get_request_queue(self, api_path: str) -> None:
        return None

    def run(self, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
        """LitServer.run on a socket bound here, on any address or host name, before any worker
        starts (a taken port fails at once). Keyword arguments reach uvicorn.Config."""
        for name, value in self.worker_env.items():  # read by libraries as workers import them
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

    def _register_spec_endpoints(self, lit_api: ls.LitAPI) -> None:
        lit_api.spec._server = self
        for path, endpoint, methods in lit_api.spec.endpoints:
            options = dict(getattr(endpoint, "route_options", {}))  # status code, summary (/docs)
            responses = {**ERROR_RESPONSES, **options.pop("responses", {})}
            self.app.router.add_api_route(
                path,
                endpoint,
                methods=methods,
                responses=responses,
                route_class_override=JsonBodyRoute,
                **options,
            )

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if os.environ.get(LOG_FORMAT_ENV) == "json":  # LitServe's run() set its own handler again
            adopt_litserve_logger()
        if self.on_start is not None:
            await self.on_start()
        yield

    def verify_worker_status(self) -> None:
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

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason: str = "normal") -> None:
        # Stop the monitor first, or it restarts the workers being terminated. From a new thread:
        # Ctrl-C/SIGTERM may have cut this thread's manager connection mid-call.
        setter = threading.Thread(target=self._shutdown_event.set, daemon=True)
        setter.start()
        setter.join(timeout=2)
        # the HTTP server thread cannot be terminated; app.py exits the process once workers are gone
        self.kill_workers()

    def kill_workers(self) -> None:
        """Terminate the model workers (5 s grace, then SIGKILL) and the manager process."""
        for proc in getattr(self, "inference_workers", []):
            proc.terminate()
        for proc in getattr(self, "inference_workers", []):
            proc.join(timeout=5)
            if proc.is_alive():
                log.warning("model worker pid %d did not stop in 5 s; killed", proc.pid)
                proc.kill()
        manager = getattr(self.transport_config, "manager", None)
        if manager is not None:
            manager.shutdown()

    def worker_states(self, family: str) -> list[bool]:
        """Whether each of ``family``'s workers has loaded its models (LitServe's status keys)."""
        prefix = f"{family}_"
        return [
            v == WorkerSetupStatus.READY for k, v in self.workers_setup_status.items() if k.startswith(prefix)
        ]


class FamilyEndpointsBase(LitSpec):
    """The base of a family's endpoints. LitServe adds endpoints only through a "spec"
    (``LitSpec``), so this is one in LitServe's terms: routes registered by the server,
    per-family readiness."""

    def __init__(self, family: str):
        super().__init__()
        self.api_path = f"/{family}"

    def worker_states(self, family: str) -> list[bool]:
        return self._server.worker_states(family)

    def __getstate__(self) -> dict[str, Any]:
        # endpoints belong to the HTTP process; a worker (also a restarted one) needs none
        state = super().__getstate__()
        state["_endpoints"] = []
        return state


class WorkerLoop(_BaseLoop):
    """A worker's main loop: LitServe calls it with its own queues, which are not used."""

    def __call__(self, lit_api: ls.LitAPI, device: str, worker_id: int, *_litserve_queues: Any) -> None:
        serve(lit_api, worker_id)


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
    # uvicorn treats a socket given by fd as a Unix socket and sets no TCP_NODELAY on connections;
    # Linux copies it from the listening socket to each accepted one
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host} port {port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock
