"""ASGI middleware that answers before any route runs, and the one way they send an answer.

* :class:`DrainGate`: graceful stop. Kubernetes, Docker and systemd stop a server with SIGTERM
  and kill it a grace period later; a server that exits at once fails every request in flight,
  and a load balancer that still sends it traffic sees refused connections. So SIGTERM starts a
  drain instead (:func:`install_sigterm_drain`): every request already received runs to its
  answer (the gate counts them); a new request gets 503 ``shutting_down`` with
  ``Connection: close`` (nginx retries it on another replica with ``proxy_next_upstream
  http_503``, a client pool moves on); ``/health`` answers 503 ``draining``, so readiness probes
  take the replica out; once nothing is in flight, or after the timeout, the server stops as on
  Ctrl-C. A second SIGTERM, or Ctrl-C, stops at once.
* :class:`BearerAuth`: ``Authorization: Bearer <key>`` against several active keys, compared in
  constant time; 401 with ``WWW-Authenticate: Bearer`` otherwise.
* :class:`BodyLimit`: 413 for bodies over the limit, decided from ``Content-Length`` before
  reading, and enforced while streaming for chunked uploads; 408 for a body that has not all
  arrived ``timeout_s`` after the request began (a client that declares 500 bytes and sends 17
  would otherwise hold its connection and handler forever).

From the outside in: :class:`~apis.http.metrics.RequestContext` (apis/server.py), DrainGate,
BearerAuth, BodyLimit.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence

from starlette.exceptions import HTTPException
from starlette.types import Send

from apis.core.errors import APIError
from apis.core.replies import JSON_MEDIA_TYPE

log = logging.getLogger("visionserve")
MAX_AUTH_HEADER = 4096


async def send_json(
    send: Send, status: int, payload: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON answer through ASGI (middlewares answer before any route runs)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", JSON_MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def send_error(send: Send, error: APIError, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send_json(send, error.status, error.render(), headers)


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
    """Just inside :class:`~apis.http.metrics.RequestContext` (so refusals are counted too):
    counts HTTP requests until their answer is sent and, once the server drains, refuses new ones
    before auth or body parsing."""

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
    """Make SIGTERM drain (:class:`DrainGate`, the module doc), then raise KeyboardInterrupt in
    the main thread, the path Ctrl-C takes: workers terminated, port released. Call from the main
    thread.

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


def _header(scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v
    return None


def _count(scope, name: bytes) -> int:
    return sum(k == name for k, _ in scope.get("headers", ()))


class BearerAuth:
    def __init__(self, app, keys: list[str], is_open: Callable[[str], bool]):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.is_open = is_open

    def _problem(self, header: bytes | None) -> str | None:
        """None when the header carries a valid key, else what is wrong with it."""
        if header is None:
            return "missing Authorization header; send 'Authorization: Bearer <your API key>'"
        if len(header) > MAX_AUTH_HEADER:
            return "Authorization header is too long"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return "Authorization must use the Bearer scheme: 'Authorization: Bearer <your API key>'"
        token = token.strip()
        match = False
        for key in self.keys:  # no early exit: time does not depend on which key matched
            match |= hmac.compare_digest(token, key)
        return None if match else "invalid API key"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.is_open(scope["path"]):
            return await self.app(scope, receive, send)
        if _count(scope, b"authorization") > 1:  # proxies and frameworks disagree on which one counts
            problem = "send one Authorization header, not several"
        else:
            problem = self._problem(_header(scope, b"authorization"))
        if problem is None:
            return await self.app(scope, receive, send)
        error = APIError(401, problem, code="invalid_api_key")
        await send_error(send, error, [(b"www-authenticate", b"Bearer")])


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parser re-raises it as a 413."""


class _TooSlow(HTTPException):
    """Raised from ``receive`` when the body is late; rendered as a 408 that closes the connection."""

    code = "body_timeout"


class BodyLimit:
    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"request body is over this server's limit of {self.max_bytes} bytes; send a "
            "smaller (e.g. JPEG-compressed or downscaled) image",
            code="body_too_large",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # Up to twice the limit the connection stays open and uvicorn discards the unread
            # body: closing with unread bytes resets the connection, and a client or proxy still
            # sending (nginx, requests) sees a reset or a 502 instead of this answer. Past that,
            # close rather than read it.
            close = [(b"connection", b"close")] if int(length) > 2 * self.max_bytes else []
            return await send_error(send, self._too_large(), close)

        seen = 0
        started = False
        body_done = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive():
            nonlocal seen, body_done
            if body_done:  # after the body: waiting for a disconnect, no deadline
                return await receive()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    message = await receive()
            except TimeoutError:
                raise _TooSlow(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    f"({seen} bytes came); send the whole body at once",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise _TooLarge(413, self._too_large().message)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(send, self._too_large(), [(b"connection", b"close")])
        except _TooSlow as e:
            if not started:
                error = APIError(408, e.detail, code="body_timeout")
                await send_error(send, error, [(b"connection", b"close")])
