"""JSON null on an optional field means "use the default", on every route.

The seed's clients send every parameter of a call, null for those the caller left unset, and the
seed servers read null as the default. The field lists here come from the request models of
every family the server registers, so a route or field added later is covered; a route without
a body below fails ``test_every_route_and_optional_field_is_covered``. ``load_size`` keeps the
seed's own meaning of null (no resize). One server runs every family of configs/demo.yaml.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from apis.families import FAMILIES
from tests.conftest import KEYS

NULL_IS_A_VALUE = {"load_size"}  # null: no resize (tested below)


def _png_b64() -> str:
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


IMG = _png_b64()

# Per route, bodies with the required fields (and a few set values that keep a run short or
# the request valid); the optional fields a body leaves out are the ones sent as null with it.
BASES: dict[str, list[dict]] = {
    "clip/extract": [{"image": IMG, "load_size": 100}],
    "clip/encode_text": [{"text": "a red mug"}],
    "clip/similarity": [{"image": IMG, "text": "a red mug", "load_size": 100}],
    "clip/embed": [{"images": [IMG]}, {"texts": ["a red mug"]}],
    "clip/classify": [{"image": IMG, "labels": ["mug", "robot"]}],
    "dino/extract": [{"image": IMG}],
    "dino/embed": [{"images": [IMG]}],
    "sam2/auto_mask": [
        {"image": IMG, "preset": "coarse"},
        {"image": IMG, "points_per_side": 4, "crop_n_layers": 0},  # preset null = fine_grained
    ],
    "sam2/prompt_mask": [
        {"image": IMG, "point_coords": [[20, 20]], "point_labels": [1]},
        {"image": IMG, "box": [5, 5, 40, 30]},
    ],
    "sam2/embed": [{"image": IMG}],
    "sam3/predict": [{"image": IMG, "prompts": ["mug"]}, {"image": IMG, "boxes": [[5, 5, 40, 30]]}],
    "sam3/embed": [{"image": IMG}],
    "rmbg/remove": [{"image": IMG}],
}


def request_models() -> dict[str, type]:
    """The ``POST /<family>/<route>`` bodies (the video session routes have their own paths and
    session ids: tests/http/test_sam2_video_http.py and tests/http/test_sam3_video_http.py cover them)."""
    return {
        f"{api.family}/{r.name}": r.request
        for api in (e.api_class() for e in FAMILIES.values())
        for r in api.routes
        if r.endpoint
    }


def optional_fields(model: type) -> set[str]:
    return {name for name, f in model.model_fields.items() if not f.is_required()}


def nulled(route: str) -> list[tuple[dict, dict]]:
    """(body, the same body with every optional field it leaves out sent as null), per base."""
    fields = optional_fields(request_models()[route]) - NULL_IS_A_VALUE
    return [(base, {**base, **dict.fromkeys(sorted(fields - set(base)))}) for base in BASES[route]]


CASES = [(route, i) for route in BASES for i in range(len(BASES[route]))]


def test_every_route_and_optional_field_is_covered():
    models = request_models()
    assert set(BASES) == set(models), "give every route a base body here"
    for route, model in models.items():
        freed = set().union(*(set(null) - set(base) for base, null in nulled(route)))
        # every body carries `image` (one image field must be set); image_url, image_path go null
        assert freed == optional_fields(model) - NULL_IS_A_VALUE - {"image"}, route
        assert len(freed) >= 3, route


@pytest.mark.parametrize("route", sorted(BASES))
def test_null_validates_to_the_default_field_by_field(route):
    """Also the fields that do not change an answer on their own (pca_niter without ret_pca)."""
    model = request_models()[route]
    for base, null in nulled(route):
        want = model.model_validate_json(json.dumps(base))
        for field in set(null) - set(base):
            got = model.model_validate_json(json.dumps({**base, field: None}))
            assert got == want, (route, field)


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


def post(server, route: str, body: dict) -> requests.Response:
    return requests.post(
        f"{server.url}/{route}", json=body, headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=300
    )


@pytest.mark.parametrize(("route", "i"), CASES)
def test_every_optional_field_null_answers_as_if_left_out(server, route, i):
    base, null = nulled(route)[i]
    left_out, sent_null = post(server, route, base), post(server, route, null)
    assert left_out.status_code == 200, left_out.text
    assert sent_null.status_code == 200, sent_null.text
    assert sent_null.headers["content-type"] == left_out.headers["content-type"]
    assert sent_null.json() == left_out.json()


def test_required_fields_still_refuse_null(server):
    r = post(server, "clip/encode_text", {"text": None})
    assert r.status_code == 422 and r.json()["error"]["param"] == "text", r.text


def test_load_size_null_still_means_no_resize(server):
    none = post(server, "clip/extract", {"image": IMG, "load_size": None}).json()
    default = post(server, "clip/extract", {"image": IMG}).json()
    assert none["shape"] == [4, 5, 32]  # 45x61 padded to 56x70: the original size
    assert default["shape"] == [74, 100, 32]  # the default 1024: shorter side 1024 px
