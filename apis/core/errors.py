"""One error shape for every route, OpenAI style: ``{"error": {"message", "type", "param", "code"}}``.

Model code raises :class:`APIError`; the HTTP layer (apis/http/errors.py) turns it, and
FastAPI's own validation and HTTP errors, into that JSON body. Inside a batch an error is
carried as a value, never raised past ``predict``, so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

from typing import Any

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

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }
