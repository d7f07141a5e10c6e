"""Every contact with uvicorn's internals (checked against uvicorn 0.55.0, httptools 0.9.0): the
HTTP server's own guards, below the ASGI app: limits on the request line and headers, and the
errors the HTTP parser answers by itself in the project's JSON error shape.

uvicorn has no public API for either: this subclasses its ``HttpToolsProtocol`` (not part of its
documented interface), overriding the parser callbacks and ``send_400_response``.

uvicorn (with httptools) puts no limit on a request's head, and httptools gathers a long header
value by concatenation, so its cost grows with the square of the size. :func:`http_protocol`
gives uvicorn a protocol class that refuses a head over ``limits.max_header_bytes`` (431), a
URL over ``limits.max_url_bytes`` (414) or more than ``limits.max_headers`` headers (431), and
answers malformed requests (an unknown method, Content-Length together with chunked encoding,
broken chunks) with a JSON 400.
"""

from __future__ import annotations

import http

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from apis.core.errors import APIError
from apis.core.settings import Limits

#: The uvicorn release whose HttpToolsProtocol this module was checked against: the callbacks it
#: overrides (data_received, on_message_begin, on_url, on_header, on_headers_complete,
#: on_message_complete, send_400_response) and what it reads (url, headers, transport,
#: server_state.default_headers). tests/unit/test_internals_contract.py fails on any other.
UVICORN_VERSION = "0.55.0"


class _Refused(Exception):
    """Raised from a parser callback; httptools turns it into an HttpParserError."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits and JSON errors (limits set by subclassing)."""

    max_header_bytes = 32 * 1024
    max_url_bytes = 8 * 1024
    max_headers = 100

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_head = True  # between requests, or reading a request's line and headers
        self._head_bytes = 0  # bytes received while in the head (the last chunk may hold body too)
        self._header_bytes = 0
        self._refusal: tuple[int, str] | None = None

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            # headers still incomplete: a slow flood of header bytes, refused before it is parsed whole
            self._refusal = self._too_large_head()
            self.send_400_response("")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_url_bytes:
            self._refuse(414, f"the request URL is over this server's limit of {self.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.max_header_bytes:
            self._refuse(*self._too_large_head())
        if len(self.headers) > self.max_headers:
            self._refuse(431, f"the request has more than this server's limit of {self.max_headers} headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        super().on_message_complete()

    def _too_large_head(self) -> tuple[int, str]:
        return 431, f"the request headers are over this server's limit of {self.max_header_bytes} bytes"

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        raise _Refused(message)

    def send_400_response(self, msg: str) -> None:
        """Every error the parser answers by itself, in the JSON error shape; closes the connection."""
        status, message = self._refusal or (
            400,
            "malformed HTTP request (request line, headers, method or body framing); send valid HTTP/1.1",
        )
        self._refusal = None
        payload = APIError(status, message, code="bad_http_request").render()
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(payload)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + payload)
        self.transport.close()


def http_protocol(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class uvicorn should run (its ``http`` setting), with these limits."""
    return type(
        "HttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_header_bytes": limits.max_header_bytes,
            "max_url_bytes": limits.max_url_bytes,
            "max_headers": limits.max_headers,
        },
    )
