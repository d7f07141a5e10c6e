"""The route class of the model routes: pydantic parses and validates a JSON body in one pass,
and a request whose client goes away is dropped, not computed for nobody."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

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
    gone = asyncio.ensure_future(_disconnected(request))
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


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
