"""Answers as Starlette responses: a worker's rendered :class:`~apis.core.replies.Reply`, a
stream of them, or an :class:`~apis.core.errors.APIError` raised on the HTTP side; and the same
error sent straight through ASGI by the middlewares, which answer before any route runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from apis.core.errors import APIError
from apis.core.replies import JSON_MEDIA_TYPE, Reply


def reply_response(reply: Reply, status: int | None = None) -> Response:
    """``status``: the code of a success other than 200 (201 for a created resource)."""
    # A memoryview is sent as is; bytes(bytearray) would copy the body once more.
    code = status if status is not None and reply.status == 200 else reply.status
    return Response(memoryview(reply.body), code, reply.headers, reply.media_type)


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error.render(), error.status, headers, JSON_MEDIA_TYPE)


async def send_json(
    send: Send, status: int, payload: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """A whole JSON answer through ASGI (for middlewares, which answer before any route runs)."""
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


class PartsResponse(StreamingResponse):
    """A 200 whose body is the parts of a streamed answer, each sent as it comes (NDJSON lines).

    A part that is an error (the worker's stream failed after it began) is written as one more
    line, its error body. Whatever the ASGI server's version, the client's disconnect is watched
    while the next part is awaited, and ``parts`` is closed at once: that withdraws the job, and
    the worker stops before its next part (apis/transport/dispatch.py)."""

    def __init__(self, first: Reply, parts: AsyncIterator[Reply]):
        super().__init__(parts, media_type=first.media_type)
        self.first = first
        self.parts = parts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
            if pump.done():
                pump.result()
        finally:
            for task in (pump, gone):
                task.cancel()
            # the pump may be inside the parts iterator: let it unwind before closing that
            await asyncio.gather(pump, gone, return_exceptions=True)
            await self.parts.aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        reply = self.first
        while True:
            body = bytes(reply.body)
            if reply.status != 200:  # the stream failed after it began: its error is the last line
                body += b"\n"
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            if not reply.more:
                break
            reply = await anext(self.parts)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
