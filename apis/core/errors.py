"""One error shape for every route, OpenAI style: ``{"error": {"message", "type", "param", "code"}}``.

Model code raises :class:`APIError`; every error answer, wherever it is made (a worker, a route,
an exception handler, an ASGI middleware, the HTTP parser), is :meth:`APIError.render`'s bytes.
Inside a batch an error is carried as a value, never raised past ``predict``, so one bad request
cannot fail its neighbours.
"""

from __future__ import annotations

from typing import Any

import orjson

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_unavailable",
}


class APIError(Exception):
    """A failure the client can act on; ``message`` says what to change."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def render(self) -> bytes:
        """The JSON body of the answer: the one renderer of every error the server sends."""
        return orjson.dumps(self.body())
