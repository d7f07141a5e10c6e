"""Every route's answer holds to the schema the server itself publishes in ``/openapi.json``.

Answers are rendered to bytes in the workers (apis/core/replies.py), so FastAPI never checks them
against a route's declared response model: this file does, over HTTP, with ``jsonschema``. It
reads each route's 200 schema (and the 4XX error schema) from the live ``/openapi.json``,
resolves the ``$ref``s to its components, and validates one answer per answer shape (dtype, PCA,
mask encodings, RLE modes, SAM 3 prompts and boxes, float and base64 embeddings, ...). Objects
that list their properties are also closed (no undeclared key may appear), so the published
schema is the whole answer. A route the server lists with a JSON 200 schema but no case here
fails ``test_every_route_with_a_schema_has_a_case``. One server runs every family of
configs/demo.yaml.
"""

from __future__ import annotations

import base64
import copy
import io
import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import KEYS

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def _png_b64(h: int = 45, w: int = 61) -> str:
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


IMG = _png_b64()
DENSE = {"image": IMG, "load_size": 56}
# Untrained SAM weights score low: thresholds of 0 keep instances and masks, so the item
# schemas (Sam2Mask, Sam3Instance, Sam3Mask) are exercised, not only empty lists.
AUTO = {
    "image": IMG,
    "points_per_side": 4,
    "crop_n_layers": 0,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
}
SAM3 = {"image": IMG, "score_threshold": 0.0, "min_area": 0.0}
SESSION = "/sam2/video/sessions/{session_id}"
VIDEO_POINT = {"frame_index": 0, "obj_id": 1, "points": [[20, 20]], "labels": [1]}
SAM3_SESSION = "/sam3/video/sessions/{session_id}"
# the untrained demo model finds no instance of a text; points on its propagated outputs add one
SAM3_POINT = {"frame_index": 0, "points": [[20, 20]], "point_labels": [1], "obj_id": 1}


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: dict | None = None  # None: GET
    npy: bool = False  # the answer is a .npy file, not JSON
    nonempty: tuple[str, ...] = ()  # list fields that must not be empty (so their items are checked)
    path_params: dict[str, str] = field(default_factory=dict)  # "@clip" / "@live": a video session's id
    status: int = 200
    ndjson: bool = False  # the answer is NDJSON lines: each but the totals line is checked


CASES = [
    Case("clip-extract", "/clip/extract", DENSE),
    Case(
        "clip-extract-pca-fp16-chw",
        "/clip/extract",
        {**DENSE, "ret_pca": True, "output_dtype": "float16", "tensor_format": "CHW"},
    ),
    Case("clip-extract-npy", "/clip/extract", {**DENSE, "response_format": "npy"}, npy=True),
    Case("clip-encode_text", "/clip/encode_text", {"text": "a red mug"}),
    Case("clip-encode_text-fp16", "/clip/encode_text", {"text": "a red mug", "output_dtype": "float16"}),
    Case("clip-similarity", "/clip/similarity", {**DENSE, "text": "a red mug"}),
    Case("clip-similarity-negatives", "/clip/similarity", {**DENSE, "text": "mug", "negatives": ["robot"]}),
    Case(
        "clip-similarity-npy",
        "/clip/similarity",
        {**DENSE, "text": "mug", "response_format": "npy"},
        npy=True,
    ),
    Case("clip-embed", "/clip/embed", {"images": [IMG], "texts": ["a red mug", "a robot"]}),
    Case("clip-embed-texts-fp16", "/clip/embed", {"texts": ["a red mug"], "output_dtype": "float16"}),
    Case("clip-classify", "/clip/classify", {"image": IMG, "labels": ["mug", "robot"]}, nonempty=("labels",)),
    Case("dino-extract", "/dino/extract", {"image": IMG}),
    Case(
        "dino-extract-pca-bin-fp16",
        "/dino/extract",
        {"image": IMG, "ret_pca": True, "bin": True, "output_dtype": "float16"},
    ),
    Case("dino-extract-npy", "/dino/extract", {"image": IMG, "response_format": "npy"}, npy=True),
    Case("dino-embed", "/dino/embed", {"images": [IMG, IMG]}),
    Case("dino-embed-mean-raw", "/dino/embed", {"images": [IMG], "pooling": "mean", "normalize": False}),
    Case("sam2-auto_mask-float32", "/sam2/auto_mask", AUTO, nonempty=("masks",)),
    Case(
        "sam2-auto_mask-packbits",
        "/sam2/auto_mask",
        {**AUTO, "mask_encoding": "packbits"},
        nonempty=("masks",),
    ),
    Case("sam2-auto_mask-png", "/sam2/auto_mask", {**AUTO, "mask_encoding": "png"}, nonempty=("masks",)),
    Case(
        "sam2-auto_mask-uncompressed_rle",
        "/sam2/auto_mask",
        {**AUTO, "output_mode": "uncompressed_rle"},
        nonempty=("masks",),
    ),
    Case(
        "sam2-auto_mask-coco_rle", "/sam2/auto_mask", {**AUTO, "output_mode": "coco_rle"}, nonempty=("masks",)
    ),
    Case(
        "sam2-prompt_mask-points",
        "/sam2/prompt_mask",
        {"image": IMG, "point_coords": [[20, 20]], "point_labels": [1]},
    ),
    Case(
        "sam2-prompt_mask-box-packbits",
        "/sam2/prompt_mask",
        {"image": IMG, "box": [5, 5, 40, 30], "mask_encoding": "packbits", "multimask_output": False},
    ),
    Case(
        "sam2-prompt_mask-logits",
        "/sam2/prompt_mask",
        {"image": IMG, "box": [5, 5, 40, 30], "return_logits": True},
    ),
    Case(
        "sam2-prompt_mask-click-coco_rle-best_only-no-low_res",
        "/sam2/prompt_mask",
        {
            "image": IMG,
            "point_coords": [[20, 20]],
            "point_labels": [1],
            "mask_encoding": "coco_rle",
            "best_only": True,
            "return_low_res_masks": False,
        },
        nonempty=("masks",),
    ),
    Case(
        "sam2-prompt_mask-low_res-float16",
        "/sam2/prompt_mask",
        {"image": IMG, "point_coords": [[20, 20]], "point_labels": [1], "low_res_dtype": "float16"},
    ),
    Case("sam2-embed", "/sam2/embed", {"image": IMG}),
    Case(
        "sam3-predict-prompts", "/sam3/predict", {**SAM3, "prompts": ["mug", "robot"]}, nonempty=("results",)
    ),
    Case(
        "sam3-predict-boxes-rle",
        "/sam3/predict",
        {**SAM3, "boxes": [[5, 5, 40, 30]], "return_masks": True},
        nonempty=("results",),
    ),
    Case(
        "sam3-predict-both-png",
        "/sam3/predict",
        {
            **SAM3,
            "prompts": ["mug"],
            "boxes": [[5, 5, 40, 30]],
            "box_labels": [0],
            "return_masks": True,
            "mask_format": "png",
        },
        nonempty=("results",),
    ),
    Case("sam3-embed", "/sam3/embed", {"image": IMG}),
    Case("rmbg-remove-rgba", "/rmbg/remove", {"image": IMG}),
    Case("rmbg-remove-mask-webp", "/rmbg/remove", {"image": IMG, "output": "mask", "output_format": "webp"}),
    Case("rmbg-remove-both-threshold", "/rmbg/remove", {"image": IMG, "output": "both", "threshold": 0.5}),
    Case(
        "v1-embeddings-text-float",
        "/v1/embeddings",
        {"input": "a red mug", "model": "clip-tiny/random"},
        nonempty=("data",),
    ),
    Case(
        "v1-embeddings-image-base64",
        "/v1/embeddings",
        {
            "input": [f"data:image/png;base64,{IMG}", "a mug"],
            "model": "clip-tiny/random",
            "encoding_format": "base64",
        },
        nonempty=("data",),
    ),
    Case(
        "v1-embeddings-dino", "/v1/embeddings", {"input": [IMG], "model": "dinov2_tiny14"}, nonempty=("data",)
    ),
    Case("v1-models", "/v1/models", nonempty=("data",)),
    Case("v1-models-one", "/v1/models/{model}", path_params={"model": "dinov2_tiny14_reg"}),
    Case("sam2-video-create", "/sam2/video/sessions", {"frames": [IMG, IMG]}, status=201),
    Case("sam2-video-get", SESSION, path_params={"session_id": "@clip"}, nonempty=("objects",)),
    Case(
        "sam2-video-prompts",
        SESSION + "/prompts",
        VIDEO_POINT,
        path_params={"session_id": "@clip"},
        nonempty=("objects",),
    ),
    Case(
        "sam2-video-prompts-polygons",
        SESSION + "/prompts",
        {**VIDEO_POINT, "mask_encoding": "polygons"},
        path_params={"session_id": "@clip"},
    ),
    Case("sam2-video-frames", SESSION + "/frames", {"image": IMG}, path_params={"session_id": "@live"}),
    Case(
        "sam2-video-propagate",
        SESSION + "/propagate",
        {"mask_encoding": "png"},
        path_params={"session_id": "@clip"},
        ndjson=True,
    ),
    Case("sam3-video-create", "/sam3/video/sessions", {"frames": [IMG, IMG]}, status=201),
    Case("sam3-video-get", SAM3_SESSION, path_params={"session_id": "@clip"}, nonempty=("objects",)),
    Case(
        "sam3-video-prompts",
        SAM3_SESSION + "/prompts",
        SAM3_POINT,
        path_params={"session_id": "@clip"},
    ),
    Case("sam3-video-frames", SAM3_SESSION + "/frames", {"image": IMG}, path_params={"session_id": "@live"}),
    Case(
        "sam3-video-propagate",
        SAM3_SESSION + "/propagate",
        {"mask_encoding": "polygons"},
        path_params={"session_id": "@clip"},
        ndjson=True,
    ),
]

# Error answers, each against the schema the route declares for its status (4XX).
ERRORS = [
    ("422-family-body", "/clip/encode_text", {"text": None}, 422),
    ("422-unknown-field", "/sam2/prompt_mask", {"image": IMG, "box": [1, 1, 5, 5], "boxes": []}, 422),
    ("400-box-outside-image", "/sam3/predict", {"image": IMG, "boxes": [[5, 5, 80, 30]]}, 400),
    ("400-unknown-model", "/dino/extract", {"image": IMG, "model_type": "no_such_dino"}, 400),
    ("400-openai-body", "/v1/embeddings", {"input": "x"}, 400),
    ("404-openai-model", "/v1/embeddings", {"input": "x", "model": "nope"}, 404),
]


@pytest.fixture(scope="module")
def server(demo_server):
    return demo_server


@pytest.fixture(scope="module")
def spec(server) -> dict:
    r = requests.get(server.url + "/openapi.json", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its properties
    and says nothing about others (pydantic's default), so an undeclared key fails too."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def check(spec: dict, schema: dict, answer: Any) -> None:
    """Validate ``answer`` against ``schema``, whose ``$ref``s point into the spec's components;
    fails the test with every violation, each with its place in the answer."""
    root = closed({**schema, "components": spec.get("components", {})})
    validator = jsonschema.Draft202012Validator(root)
    problems = [
        f"{'/'.join(map(str, e.absolute_path)) or '(answer)'}: {e.message}"
        for e in validator.iter_errors(answer)
    ]
    assert not problems, "\n".join(problems)


def declared(spec: dict, path: str, method: str, status: int) -> dict:
    """The JSON schema the route declares for ``status`` (exact code first, then its range)."""
    responses = spec["paths"][path][method]["responses"]
    entry = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX") or responses.get("default")
    assert entry is not None, f"{method.upper()} {path} declares no answer for {status}: {sorted(responses)}"
    schema = entry.get("content", {}).get("application/json", {}).get("schema")
    assert schema, f"{method.upper()} {path} declares no JSON schema for {status}"
    return schema


_sessions: dict[tuple[str, str], str] = {}
_SETUP = {  # a clip session's calls before the cases: (route, body)
    "sam2": [("prompts", VIDEO_POINT)],
    "sam3": [
        ("prompts", {"frame_index": 0, "text": "mug"}),
        ("propagate", {}),
        ("prompts", SAM3_POINT),
        ("propagate", {}),
    ],
}


def session_id(server, family: str, kind: str) -> str:
    """A video session of this module: "@clip" (two frames, one object prompted) or "@live"."""
    if (family, kind) not in _sessions:
        body = {"frames": [IMG, IMG]} if kind == "@clip" else {}
        url = f"{server.url}/{family}/video/sessions"
        r = requests.post(url, json=body, headers=AUTH, timeout=300)
        assert r.status_code == 201, r.text
        sid = _sessions[(family, kind)] = r.json()["session_id"]
        if kind == "@clip":
            for route, body in _SETUP[family]:
                r = requests.post(f"{url}/{sid}/{route}", json=body, headers=AUTH, timeout=300)
                assert r.status_code == 200 and "error" not in r.text, r.text
    return _sessions[(family, kind)]


def call(server, case: Case) -> requests.Response:
    family = case.path.split("/")[1]
    params = {
        k: session_id(server, family, v) if v.startswith("@") else v for k, v in case.path_params.items()
    }
    url = server.url + case.path.format(**params)
    if case.body is None:
        return requests.get(url, headers=AUTH, timeout=300)
    return requests.post(url, json=case.body, headers=AUTH, timeout=300)


def success_schema(op: dict) -> dict | None:
    """The JSON (or NDJSON lines') schema of a route's 200 or 201 answer."""
    for status in ("200", "201"):
        content = op.get("responses", {}).get(status, {}).get("content", {})
        for media in ("application/json", "application/x-ndjson"):
            if content.get(media, {}).get("schema"):
                return content[media]["schema"]
    return None


def test_every_route_with_a_schema_has_a_case(spec):
    with_schema = {
        (path, method)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if success_schema(op)
    }
    covered = {(c.path, "get" if c.body is None else "post") for c in CASES}
    assert with_schema - covered == set(), "give these routes a case here"
    assert covered - with_schema == set(), "these cases' routes publish no 200 JSON schema"
    # every POST route declares a schema (what a client generator reads)
    posts = {(path, "post") for path, ops in spec["paths"].items() if "post" in ops}
    assert posts <= with_schema, posts - with_schema


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_answer_matches_its_schema(server, spec, case):
    r = call(server, case)
    assert r.status_code == case.status, r.text
    method = "get" if case.body is None else "post"
    if case.ndjson:
        assert r.headers["content-type"] == "application/x-ndjson"
        *frames, totals = [json.loads(line) for line in r.text.splitlines()]
        assert frames and totals["done"]
        schema = spec["paths"][case.path][method]["responses"]["200"]["content"]["application/x-ndjson"][
            "schema"
        ]
        for frame in frames:
            check(spec, schema, frame)
        return
    if case.npy:  # the body IS the .npy file; its meta comes as headers
        assert r.headers["content-type"] == "application/x-npy"
        arr = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert arr.ndim >= 2 and arr.dtype == np.float32
        assert r.headers["x-visionserve-model"]
        return
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    for name in case.nonempty:
        assert answer[name], f"{name} is empty: its items' schema would go unchecked"
    check(spec, declared(spec, case.path, method, case.status), answer)


@pytest.mark.parametrize(("path", "body", "status"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_answers_match_the_declared_error_schema(server, spec, path, body, status):
    r = requests.post(server.url + path, json=body, headers=AUTH, timeout=300)
    assert r.status_code == status, r.text
    check(spec, declared(spec, path, "post", status), r.json())


def test_refused_key_matches_the_declared_error_schema(server, spec):
    r = requests.post(server.url + "/clip/encode_text", json={"text": "x"}, timeout=30)
    assert r.status_code == 401, r.text
    check(spec, declared(spec, "/clip/encode_text", "post", 401), r.json())


def test_the_check_catches_a_missing_field_and_a_wrong_type(spec):
    """The validation above fails on the faults it is there for (and not only in theory)."""
    good = {"image_id": "ab" * 32, "width": 61, "height": 45, "cached": False, "model": "m"}
    schema = declared(spec, "/sam3/embed", "post", 200)
    check(spec, schema, good)
    for bad in (
        {k: v for k, v in good.items() if k != "cached"},
        {**good, "width": "61"},
        {**good, "undeclared": 1},
    ):
        with pytest.raises(AssertionError):
            check(spec, schema, copy.deepcopy(bad))


def _client_routes() -> list[tuple[str, Any]]:
    from clients import clip_client, dino_client, rmbg_client, sam2_client
    from clients.sam3_client import Sam3ServiceClient

    sam3 = Sam3ServiceClient("http://unused", "unused")
    return [
        ("/clip/extract", clip_client.extract_clip_features),
        ("/clip/encode_text", clip_client.encode_clip_text),
        ("/clip/similarity", clip_client.compute_clip_similarity),
        ("/clip/embed", clip_client.embed_clip),
        ("/clip/classify", clip_client.classify_clip),
        ("/dino/extract", dino_client.extract_dino_features),
        ("/dino/embed", dino_client.embed_dino),
        ("/sam2/embed", sam2_client.embed_sam2_image),
        ("/sam2/auto_mask", sam2_client.generate_sam2_auto_masks),
        ("/sam2/prompt_mask", sam2_client.generate_sam2_prompt_masks),
        ("/sam3/predict", sam3.predict),
        ("/sam3/embed", sam3.embed),
        ("/rmbg/remove", rmbg_client.remove_background_response),
    ]


CLIENT_ROUTES = _client_routes()


def _request_fields(spec: dict, path: str) -> dict[str, dict]:
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    while "$ref" in body:
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    return body["properties"]


@pytest.mark.parametrize("path, fn", CLIENT_ROUTES, ids=[p for p, _ in CLIENT_ROUTES])
def test_client_parameters_cover_every_request_field_with_the_servers_defaults(spec, path, fn):
    """Every field of the route's published request schema is a parameter of its client function,
    and a client default is the server's (None: the field left to the server, which reads null as
    its default: test_null_fields)."""
    import inspect

    params = inspect.signature(fn).parameters
    fields = _request_fields(spec, path)
    assert set(fields) <= set(params), f"{fn.__name__} lacks {sorted(set(fields) - set(params))}"
    for name, schema in fields.items():
        default = params[name].default
        if default is None or default is inspect.Parameter.empty or "default" not in schema:
            continue
        want = schema["default"]
        got = list(default) if isinstance(default, tuple) else default
        assert got == want or (want is None and got == []), (fn.__name__, name, got, want)


class _Recorder:
    """Stands in for clients.common.send: records (method, path, body) and answers what a
    session needs (its creation, an empty stream), so each client's request bodies can be held
    to the published schemas without a model."""

    def __init__(self):
        self.sent: list[tuple[str, str, dict | None]] = []

    def __call__(self, method: str, url: str, api_key, timeout, json=None, **kwargs):
        from unittest.mock import MagicMock

        self.sent.append((method, url.split("/video/sessions", 1)[1], json))
        resp = MagicMock(content=b"{}")
        resp.json.return_value = {"session_id": "s1", "num_frames": 2, "frame_index": 0, "objects": []}
        resp.__enter__.return_value = resp
        resp.iter_lines.return_value = [b'{"done": true, "frames": 0}']
        return resp

    def body(self, method: str, route: str) -> dict:
        return next(b for m, r, b in reversed(self.sent) if m == method and r == route)


_VIDEO_ROUTES = {"": "/video/sessions", "/s1/prompts": "/video/sessions/{session_id}/prompts"}
_VIDEO_ROUTES |= {
    "/s1/propagate": "/video/sessions/{session_id}/propagate",
    "/s1/frames": "/video/sessions/{session_id}/frames",
}


@pytest.mark.parametrize("family", ["sam2", "sam3"])
def test_video_session_clients_send_every_request_field_with_the_servers_defaults(spec, monkeypatch, family):
    """Sam2VideoSession / Sam3VideoSession: every field of each session route's published
    request schema is sent when its argument is given, nothing else is sent, and what the
    client sends when left at its defaults is the schema's default."""
    import inspect

    from clients import video
    from clients.sam2_client import Sam2VideoSession
    from clients.sam3_client import Sam3VideoSession

    rec = _Recorder()
    monkeypatch.setattr(video, "send", rec)
    cls = {"sam2": Sam2VideoSession, "sam3": Sam3VideoSession}[family]
    png = base64.b64decode(IMG)
    fields = {r: _request_fields(spec, f"/{family}{p}") for r, p in _VIDEO_ROUTES.items()}

    def at_defaults(route: str, body: dict) -> None:
        assert set(body) <= set(fields[route]), (route, sorted(set(body) - set(fields[route])))
        for name, value in body.items():
            want = fields[route][name].get("default")
            if name not in (
                "video",
                "frames",
                "video_path",
                "image",
                "frame_index",
                "obj_id",
                "text",
                "points",
            ):
                assert value == want, (route, name, value, want)

    # at the defaults
    session = cls("http://x/" + family, frames=[png, png], api_key="k")
    at_defaults("", rec.body("POST", ""))
    list(session.propagate())
    at_defaults("/s1/propagate", rec.body("POST", "/s1/propagate"))
    session.add_frame(png)
    at_defaults("/s1/frames", rec.body("POST", "/s1/frames"))
    session.prompt(0, **({"obj_id": 1, "points": [[1, 2]]} if family == "sam2" else {"text": "a"}))
    at_defaults("/s1/prompts", rec.body("POST", "/s1/prompts"))
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in fields[""] and "default" in fields[""][name] and p.default is not None:
            assert p.default == fields[""][name]["default"], name
    assert (
        inspect.signature(cls.__init__).parameters["mask_encoding"].default
        == (fields["/s1/prompts"]["mask_encoding"]["default"])
    )

    # every argument given: every field sent (the clip as video, frames or video_path in turn)
    sent: dict[str, set] = {r: set() for r in fields}
    selector = {"sam2": {"model_cfg": "m", "checkpoint_path": "m.pt"}, "sam3": {"model": "m"}}[family]
    offload = {"offload_video_to_cpu": True} | ({"offload_state_to_cpu": True} if family == "sam2" else {})
    for clip in ({"video": png}, {"frames": [png]}, {"video_path": "c.mp4"}):
        cls(
            "http://x/" + family,
            **clip,
            api_key="k",
            max_frames=2,
            mask_encoding="png",
            **selector,
            **offload,
        )
        sent[""] |= set(rec.body("POST", ""))
    list(session.propagate(direction="backward", start_frame_index=1, max_frames=1))
    for image in ({"image": png}, {"image_url": "http://h/a.png"}, {"image_path": "a.png"}):
        session.add_frame(**image)
        sent["/s1/frames"] |= set(rec.body("POST", "/s1/frames"))
    if family == "sam2":
        session.prompt(
            0, 1, points=[[1, 2]], labels=[1], box=[0, 0, 3, 3], mask=np.ones((2, 2)), clear_old_points=False
        )
    else:
        session.prompt(
            0, "a", boxes=[[0, 0, 3, 3]], box_labels=[1], points=[[1, 2]], point_labels=[1], obj_id=1
        )
    for route in ("/s1/propagate", "/s1/prompts"):
        sent[route] |= set(rec.body("POST", route))
    if family == "sam3":  # its one accepted value is the default (true is a 400: sam3_video_http)
        sent[""].add("offload_state_to_cpu")
    for route, names in sent.items():
        assert names == set(fields[route]), (route, sorted(set(fields[route]) ^ names))
