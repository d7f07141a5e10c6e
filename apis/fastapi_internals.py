"""Every contact with FastAPI's internals, checked against FastAPI 0.165.0.

:class:`~apis.http.routing.JsonBodyRoute` overrides ``APIRoute.get_route_handler`` (FastAPI's
documented way to customise a route class) and needs the route's request model, which FastAPI
keeps only in the undocumented ``APIRoute.body_field``. tests/unit/test_internals_contract.py fails on
any other release.
"""

from __future__ import annotations

from fastapi.routing import APIRoute
from pydantic import BaseModel

FASTAPI_VERSION = "0.165.0"


def body_model(route: APIRoute) -> type[BaseModel] | None:
    """The pydantic model of the route's JSON body; None for a route without a body."""
    if route.body_field is None:
        return None
    return route.body_field.field_info.annotation
