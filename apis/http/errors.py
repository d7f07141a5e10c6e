"""The HTTP side of the one error shape (apis/core/errors.py): APIError and FastAPI's own
validation and HTTP errors rendered as JSON answers."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from apis.core.errors import APIError
from apis.http.routing import error_response


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer, as :meth:`~apis.core.errors.APIError.render` writes it."""

    error: ErrorDetail


#: ``responses=`` of every route: its 4xx answers in /openapi.json are this shape, not FastAPI's
#: default 422 ``HTTPValidationError`` (which this server never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request was refused; `error.message` says why."}
}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        if err.get("type") == "value_error":  # our own validators: the message says it all
            msg = msg.removeprefix("Value error, ")
            parts.append(msg if where == "body" else f"{where}: {msg}")
            continue
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app) -> None:
    """Render every error the app produces in the one shape above."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(APIError(422, message, param=param, code="validation_error"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        # a bug: still logged with its traceback by Starlette, but answered in the JSON shape
        return error_response(
            APIError(500, "internal server error (details are in the server log)", code="internal_error")
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        error = APIError(exc.status_code, detail, code=getattr(exc, "code", None))
        return error_response(error, headers=exc.headers)
