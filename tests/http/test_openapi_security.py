"""The OpenAPI document declares the bearer key, so Swagger UI's "Authorize" sends it: a
``bearerAuth`` HTTP bearer scheme on every operation that needs a key, none on the open ones."""

from __future__ import annotations

import requests

from tests.conftest import KEYS


def test_every_keyed_operation_names_the_bearer_scheme(demo_server):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    schema = requests.get(demo_server.url + "/openapi.json", headers=auth, timeout=30).json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's API keys (--api-key, VISIONSERVE_API_KEYS).",
    }
    seen = {}
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            seen[method.upper(), path] = op["security"]
    assert seen["POST", "/clip/encode_text"] == [{"bearerAuth": []}]
    assert seen["POST", "/v1/embeddings"] == [{"bearerAuth": []}]
    assert seen["GET", "/info"] == [{"bearerAuth": []}]
    assert seen["GET", "/health"] == []
    # what the document says is what the server does: open operations answer without a key
    for (method, path), security in seen.items():
        if method == "GET" and "{" not in path and path != "/playground":
            status = requests.get(demo_server.url + path, timeout=30).status_code
            assert (status == 401) == bool(security), (path, status)
