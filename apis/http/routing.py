"""The route class of the model routes and the responses it sends: pydantic parses and
validates a JSON body in one pass, a request whose client goes away is dropped, not computed for
nobody, and the answer is a Starlette response: a worker's rendered
:class:`~apis.core.replies.Reply`, a stream of them, or an :class:`~apis.core.errors.APIError`
raised on the HTTP side (the middlewares, which answer before any route runs, send theirs
through ASGI: apis/http/middleware.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from apis.core.errors import APIError
from apis.core.replies import JSON_MEDIA_TYPE, Reply
from apis.fastapi_internals import body_model

log = logging.getLogger("visionserve")
CLIENT_GONE = 499  # nginx's status for "client closed the request"; nobody reads it


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JsonBodyRoute(APIRoute):
    """pydantic's ``model_validate_json`` parses and validates the body from its bytes in one
    pass, about half the event loop's time of FastAPI's json.loads + validation (docs/benchmarks.md,
    Measured choices).

    ``/docs`` and ``/openapi.json`` are FastAPI's, made from the endpoint's signature as before.
    Errors are FastAPI's ``RequestValidationError`` with the same locations, rendered by
    apis/core/errors.py. The endpoint is a coroutine taking the validated model; routes without a
    body keep FastAPI's handler. Route dependencies are not run (auth is ASGI middleware here).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        model = body_model(self)
        if model is None:
            return super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            if not _is_json(request.headers.get("content-type")):
                problem = {
                    "type": "value_error",
                    "loc": ("body",),
                    "msg": "send the body as JSON, with the header 'Content-Type: application/json'",
                }
                raise RequestValidationError([problem])
            try:
                body = await request.body()
            except ClientDisconnect:
                log.info(
                    "%s %s: the client went away while sending the body", request.method, request.url.path
                )
                return Response(status_code=CLIENT_GONE)
            try:
                value = model.model_validate_json(body)
            except ValidationError as e:
                errors = [
                    {**err, "loc": ("body", *err["loc"])}
                    for err in e.errors(include_url=False, include_input=False)
                ]
                raise RequestValidationError(errors) from None
            return await unless_client_leaves(request, endpoint(value, **request.path_params))

        return handler


async def unless_client_leaves(request: Request, work: Awaitable[Response]) -> Response:
    """``work``'s response, or, if the client disconnects first, ``work`` cancelled (a request
    still queued for a worker is then withdrawn: apis/transport/dispatch.py)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        log.info("%s %s: the client went away; request dropped", request.method, request.url.path)
        return Response(status_code=CLIENT_GONE)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


def reply_response(reply: Reply, status: int | None = None) -> Response:
    """``status``: the code of a success other than 200 (201 for a created resource)."""
    # A memoryview is sent as is; bytes(bytearray) would copy the body once more.
    code = status if status is not None and reply.status == 200 else reply.status
    return Response(memoryview(reply.body), code, reply.headers, reply.media_type)


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error.render(), error.status, headers, JSON_MEDIA_TYPE)


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
    """Returns once the client has disconnected (after the body, which the route has read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
