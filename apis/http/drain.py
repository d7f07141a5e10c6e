"""Graceful stop: on SIGTERM the server finishes the requests it holds before its workers go.

Kubernetes, Docker and systemd stop a server with SIGTERM and kill it a grace period later. A
server that exits at once fails every request in flight, and a load balancer that still sends it
traffic sees refused connections. So SIGTERM starts a drain instead:

* every request already received runs to its answer (:class:`DrainGate` counts them);
* a new request gets 503 ``shutting_down`` with ``Connection: close``: nginx retries it on another
  replica (``proxy_next_upstream http_503``) and a client pool moves on;
* ``/health`` answers 503 ``draining``, so readiness probes take the replica out;
* once nothing is in flight, or after ``timeout`` seconds, the server stops as on Ctrl-C.

A second SIGTERM, or Ctrl-C, stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from apis.core.errors import APIError
from apis.http.responses import send_error, send_json

log = logging.getLogger("visionserve")


class DrainState:
    """Requests in flight and whether the server is draining; shared by the middleware (event-loop
    thread) and the SIGTERM handler (main thread). Plain ints and bools: the GIL is enough."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False

    def wait_idle(self, timeout: float, poll: float = 0.05) -> bool:
        """Block until no request is in flight (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(poll)
        return not self.in_flight


def _is_health(path: str) -> bool:
    return path == "/health" or (path.endswith("/health") and path.count("/") == 2)


class DrainGate:
    """ASGI middleware just inside :class:`~apis.http.metrics.RequestContext` (which is outermost,
    so refusals are counted too): counts HTTP requests until their answer is sent and, once the
    server drains, refuses new ones before auth or body parsing."""

    def __init__(self, app, state: DrainState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:
            close = [(b"connection", b"close")]
            if _is_health(scope["path"]):
                return await send_json(send, 503, b'{"status":"draining"}', close)
            message = "this replica is shutting down and takes no new requests; retry (another replica)"
            return await send_error(send, APIError(503, message, code="shutting_down"), close)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


def install_sigterm_drain(state: DrainState, timeout: float) -> None:
    """Make SIGTERM drain (see the module doc), then raise KeyboardInterrupt in the main thread,
    the path Ctrl-C takes: workers terminated, port released. Call from the main thread.

    Only this process drains: LitServe's manager is forked after this and inherits the handler,
    so there SIGTERM keeps its default (exit). Send SIGTERM to the main process only (Docker and
    Kubernetes do; under systemd, KillMode=mixed)."""
    owner = os.getpid()

    def on_sigterm(signum, frame) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if state.draining:  # second SIGTERM: stop now
            raise KeyboardInterrupt
        state.draining = True
        log.info("SIGTERM: draining %d request(s) in flight (at most %.0f s)", state.in_flight, timeout)
        t0 = time.monotonic()
        if state.wait_idle(timeout):
            log.info("drained in %.1f s; stopping", time.monotonic() - t0)
        else:
            log.warning("drain timeout: stopping with %d request(s) still in flight", state.in_flight)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
