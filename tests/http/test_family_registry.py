"""A family registered from outside the project (a folder on PYTHONPATH, named by
VISIONSERVE_FAMILIES) is served by the real server: its config section, its download, its route,
/health and /info, with no other edit (apis/families.py)."""

from __future__ import annotations

import base64
import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import KEYS, ServerProcess

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}

# The whole family: one registration in its package, and its API (a model that answers the size).
REGISTRATION = '''
from pathlib import Path

from apis.families import register_family


def download(entry):
    """Stands for a library download: leaves a file, so the test sees that it ran."""
    path = Path(__file__).parent / f"{entry.name}.weights"
    path.write_text(entry.name)
    return [str(path)]


register_family("size", api="sizefam.api:SizeAPI", download=download)
'''

API = """
from pydantic import BaseModel, Field

from apis.family import FamilyAPI, Route
from apis.http.inputs import ImageInput
from apis.http.schemas import StrictRequest


class Selector(StrictRequest):
    model: str | None = Field(None, description="A configured model; null = the default.")


class SizeRequest(Selector, ImageInput):
    pass


class SizeResponse(BaseModel):
    width: int
    height: int
    model: str


class Size(Route):
    name = "size"
    request = SizeRequest
    response = SizeResponse
    summary = "The image's width and height."

    def predict(self, model, jobs):
        return [(model, job.image.size) for job in jobs]

    def encode(self, job, item, output):
        name, (width, height) = output
        return {"width": width, "height": height, "model": name}


class SizeAPI(FamilyAPI):
    family = "size"
    selector = Selector
    routes = (Size,)

    def load_model(self, entry):
        return entry.name
"""


@pytest.fixture(scope="module")
def size_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("size-family")
    package = tmp / "sizefam"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(REGISTRATION))
    (package / "api.py").write_text(textwrap.dedent(API))
    config = {"size": {"max_batch_size": 4, "models": [{"name": "tiny"}]}}
    env = {"PYTHONPATH": str(tmp), "VISIONSERVE_FAMILIES": "sizefam"}
    server = ServerProcess(config, tmp, ["--api-key", KEYS[0]], env=env)
    try:
        yield server.wait_ready(), package
    finally:
        server.stop()


def _png(width: int, height: int) -> str:
    pixels = np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_registered_family_is_served(size_server: tuple[ServerProcess, Path]) -> None:
    server, package = size_server
    assert (package / "tiny.weights").read_text() == "tiny"  # its download ran before the workers
    for width, height in ((61, 45), (3, 200)):
        r = requests.post(
            server.url + "/size/size", json={"image": _png(width, height)}, headers=AUTH, timeout=60
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"width": width, "height": height, "model": "tiny"}
    bad = requests.post(server.url + "/size/size", json={"image": "not base64!"}, headers=AUTH, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"
    assert requests.get(server.url + "/size/health", timeout=10).status_code == 200
    info = requests.get(server.url + "/info", headers=AUTH, timeout=10).json()
    assert list(info["families"]) == ["size"]
    assert info["families"]["size"]["routes"] == ["/size/size"]
    # no embeddings registered: no /v1 routes
    assert requests.get(server.url + "/v1/models", headers=AUTH, timeout=10).status_code == 404


def test_unknown_family_section_is_refused(tmp_path: Path) -> None:
    """Without the registration the section is a typo like any other: the config is refused."""
    server = ServerProcess({"size": {"models": [{"name": "tiny"}]}}, tmp_path, ["--api-key", KEYS[0]])
    assert server.proc.wait(60) != 0
    server.stop()
    assert "size" in server.log() and "Extra inputs are not permitted" in server.log()
