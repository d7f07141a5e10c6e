"""Answers as Starlette responses: a worker's rendered :class:`~apis.core.replies.Reply`, or an
:class:`~apis.core.errors.APIError` raised on the HTTP side."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from apis.core.errors import APIError
from apis.core.replies import Reply


def reply_response(reply: Reply) -> Response:
    # A memoryview is sent as is; bytes(bytearray) would copy the body once more.
    return Response(memoryview(reply.body), reply.status, reply.headers, reply.media_type)


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
