"""The uvicorn and FastAPI releases whose internals the HTTP layer was checked against.

apis/http/protocol.py subclasses uvicorn's httptools protocol (its parser callbacks and
``send_400_response``) and apis/http/routing.py reads FastAPI's ``APIRoute.body_field``. Another
release may rename or change them without an error at import time, so these tests fail until
someone has read the named module against the new release and updated its version constant and
the pin in pyproject.toml (and requirements/, `python scripts/lock.py`).
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

from fastapi.routing import APIRoute
from pydantic import BaseModel
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from apis.http import protocol, routing
from apis.http.protocol import UVICORN_VERSION, GuardedHttpToolsProtocol
from apis.http.routing import FASTAPI_VERSION, JsonBodyRoute


def _read_again(package: str, module, constant: str, checked: str) -> str:
    return (
        f"{package} {version(package)} is installed, but {module.__file__} was checked against "
        f"{package} {checked}: read it against the new release, then update {constant}, the pin in "
        "pyproject.toml and requirements/ (python scripts/lock.py)"
    )


def test_the_installed_uvicorn_is_the_release_the_protocol_was_checked_against():
    assert version("uvicorn") == UVICORN_VERSION, _read_again(
        "uvicorn", protocol, "UVICORN_VERSION", UVICORN_VERSION
    )


def test_the_installed_fastapi_is_the_release_the_route_class_was_checked_against():
    assert version("fastapi") == FASTAPI_VERSION, _read_again(
        "fastapi", routing, "FASTAPI_VERSION", FASTAPI_VERSION
    )


def test_every_overridden_protocol_method_still_exists_with_its_signature():
    ours = {name for name, value in vars(GuardedHttpToolsProtocol).items() if inspect.isfunction(value)}
    ours -= {"_too_large_head", "_refuse"}
    for name in sorted(ours):
        assert hasattr(HttpToolsProtocol, name), f"uvicorn's HttpToolsProtocol no longer has {name}"
        want = list(inspect.signature(getattr(HttpToolsProtocol, name)).parameters)
        got = list(inspect.signature(getattr(GuardedHttpToolsProtocol, name)).parameters)
        assert got == want or name == "__init__", (
            f"{name}{want} in uvicorn, {name}{got} in {protocol.__file__}"
        )


class Body(BaseModel):
    text: str


def test_a_routes_body_field_still_names_the_request_model():
    async def endpoint(body: Body) -> dict:
        return {}

    route = JsonBodyRoute("/x", endpoint, methods=["POST"])
    assert isinstance(route, APIRoute) and route.endpoint is endpoint
    assert route.body_field.field_info.annotation is Body
    assert callable(route.get_route_handler())
