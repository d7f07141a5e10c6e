"""ASGI middleware that guards every route before any handler or body parsing runs.

* :class:`BearerAuth`: ``Authorization: Bearer <key>`` against several active keys, compared in
  constant time; 401 with ``WWW-Authenticate: Bearer`` otherwise.
* :class:`BodyLimit`: 413 for bodies over the limit, decided from ``Content-Length`` before
  reading, and enforced while streaming for chunked uploads; 408 for a body that has not all
  arrived ``timeout_s`` after the request began (a client that declares 500 bytes and sends 17
  would otherwise hold its connection and handler forever).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException

from apis.core.errors import APIError
from apis.http.responses import send_error

MAX_AUTH_HEADER = 4096


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
