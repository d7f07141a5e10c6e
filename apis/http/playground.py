"""``GET /playground``: a static page to try the models by hand, shipped in the package.

Plain HTML, JavaScript and CSS from ``apis/http/playground/``, no build step. The page itself is open
(it holds nothing secret); it asks for the key and sends it as a Bearer token on every API call.
Its Content-Security-Policy allows only this server, so it can fetch nothing from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from apis.core.errors import APIError
from apis.http.routing import error_response

PREFIX = "/playground"
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def is_playground(path: str) -> bool:
    """The page's own paths, served without a key."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def install_playground(app: FastAPI) -> None:
    folder = Path(__file__).with_name("playground")
    files = {name: (folder / name).read_bytes() for name in _FILES}

    def serve(name: str) -> Response:
        return Response(files[name], media_type=_FILES[name], headers=_HEADERS)

    @app.get(PREFIX, include_in_schema=False)
    async def page() -> Response:
        return serve("index.html")

    @app.get(PREFIX + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in files:
            return error_response(APIError(404, f"no playground file {name!r}"))
        return serve(name)
