"""Bearer auth on every route but /health, and bad input -> clear 4xx JSON, server still serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from clients import VisionServeError
from clients import clip_client as cc
from tests.conftest import KEYS


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression-bomb shape) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ----------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing Authorization header"),
        ({"Authorization": "Bearer not-a-key"}, "invalid API key"),
        ({"Authorization": f"Basic {b64(b'user:' + KEYS[0].encode())}"}, "Bearer scheme"),
        ({"Authorization": KEYS[0]}, "Bearer scheme"),
        ({"Authorization": "Bearer " + "x" * 5000}, "too long"),
    ],
)
@pytest.mark.parametrize("path", ["/clip/encode_text", "/clip/extract", "/clip/similarity", "/info", "/docs"])
def test_refused_without_a_valid_bearer_key(clip_server, headers, message, path):
    method = requests.get if path in ("/info", "/docs") else requests.post
    r = method(clip_server.url + path, json={"text": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert message in r.json()["error"]["message"]


@pytest.mark.parametrize("key", KEYS)
def test_either_configured_key_works(clip_url, key):
    r = cc.encode_clip_text("hello", base_url=clip_url, api_key=key)
    assert r["shape"] == [32]


def test_client_raises_with_server_message(clip_url):
    with pytest.raises(VisionServeError) as e:
        cc.encode_clip_text("hello", base_url=clip_url, api_key="wrong")
    assert e.value.status == 401 and e.value.message == "invalid API key"


def test_health_open_info_and_docs_need_key(clip_server):
    assert requests.get(clip_server.url + "/health").status_code == 200
    # public_docs and public_metrics off (the defaults): no key, no docs, no /info, no /metrics
    for path in ("/docs", "/redoc", "/openapi.json", "/info", "/metrics"):
        r = requests.get(clip_server.url + path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
    h = requests.get(clip_server.url + "/clip/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    info = requests.get(clip_server.url + "/info", headers=auth(KEYS[1])).json()
    assert info["auth"] == "bearer" and info["families"]["clip"]["routes"] == [
        "/clip/extract",
        "/clip/encode_text",
        "/clip/similarity",
        "/clip/embed",
        "/clip/classify",
    ]
    schema = requests.get(clip_server.url + "/openapi.json", headers=auth()).json()
    assert {"/clip/extract", "/clip/encode_text", "/clip/similarity", "/v1/embeddings"} <= set(
        schema["paths"]
    )
    assert "encoding_format" in schema["components"]["schemas"]["EmbeddingsRequest"]["properties"]
    assert "load_size" in schema["components"]["schemas"]["ClipExtractRequest"]["properties"]


# ----------------------------------------------------------------------------- bad input


def post(clip_server, route: str, body) -> requests.Response:
    if isinstance(body, str):  # raw JSON text, for what json.dumps would not write
        return requests.post(
            f"{clip_server.url}/clip/{route}",
            data=body,
            headers={**auth(), "Content-Type": "application/json"},
        )
    return requests.post(f"{clip_server.url}/clip/{route}", json=body, headers=auth())


@pytest.fixture(scope="module")
def good_png(rgb_image) -> str:
    return b64(png_bytes(rgb_image))


BAD = [
    ("invalid base64", "extract", {"image": "not*base64!"}, 400, "not valid base64"),
    ("not an image", "extract", {"image": b64(b"hello, I am text")}, 400, "not a format this server reads"),
    ("bad data uri", "extract", {"image": "data:image/png,abcd"}, 400, "data URI"),
    ("no image field", "extract", {}, 422, "exactly one of"),
    ("two image fields", "extract", {"image": "AAAA", "image_path": "/x.png"}, 422, "got image, image_path"),
    (
        "unknown model",
        "encode_text",
        {"text": "x", "model_name": "ViT-H-14"},
        400,
        "this server offers: clip-tiny/testfile, clip-tiny/random",
    ),
    (
        "unknown pretrained",
        "encode_text",
        {"text": "x", "model_name": "clip-tiny", "model_pretrained": "laion"},
        400,
        "unknown clip model",
    ),
    ("wrong type load_size", "extract", {"image": "AAAA", "load_size": "big"}, 422, "load_size"),
    ("wrong type flag", "extract", {"image": "AAAA", "ret_pca": "yes"}, 422, "ret_pca"),
    ("wrong type text", "encode_text", {"text": 5}, 422, "text"),
    ("empty text", "encode_text", {"text": ""}, 422, "text"),
    ("text too long", "encode_text", {"text": "a" * 3000}, 400, "longer than"),
    ("unknown field", "extract", {"image": "AAAA", "loadsize": 5}, 422, "loadsize"),
    ("load_size zero", "extract", {"image": "AAAA", "load_size": 0}, 422, "load_size must not be 0"),
    ("bad quantiles", "extract", {"image": "AAAA", "pca_q_min": 0.9, "pca_q_max": 0.1}, 422, "pca_q_min"),
    ("unknown tensor_format", "extract", {"image": "AAAA", "tensor_format": "NHWC"}, 422, "tensor_format"),
    ("unknown padding", "extract", {"image": "AAAA", "padding_mode": "zeros"}, 422, "padding_mode"),
    ("pca on similarity", "similarity", {"image": "AAAA", "text": "x", "ret_pca": True}, 422, "ret_pca"),
    ("nan softmax", "similarity", '{"image": "AAAA", "text": "x", "softmax": NaN}', 422, "softmax"),
    ("broken json", "extract", '{"image": ', 422, "not valid JSON"),
    ("huge dimensions", "extract", {"image": b64(png_header_only(60000, 60000))}, 413, "60000x60000"),
    ("image_path outside roots", "extract", {"image_path": "/etc/passwd"}, 400, "inside one of"),
    ("image_path traversal", "extract", {"image_path": "../../../etc/passwd"}, 400, "inside one of"),
    (
        "image_url not allowed",
        "extract",
        {"image_url": "http://169.254.169.254/latest/meta-data"},
        400,
        "allow-list",
    ),
    ("image_url bad scheme", "extract", {"image_url": "file:///etc/passwd"}, 400, "http:// or https://"),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_gets_clear_4xx(clip_server, route, body, status, message):
    r = post(clip_server, route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"], err
    assert err["type"] in ("invalid_request_error", "request_too_large")


def test_dense_response_over_limit_refused_with_its_size(clip_server, good_png):
    r = post(clip_server, "extract", {"image": good_png, "ret_patches": False, "load_size": 1024})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "response_too_large"
    assert "1024x1388x32 float32" in err["message"] and "173.5 MiB raw" in err["message"]
    ok = post(
        clip_server, "extract", {"image": good_png, "ret_patches": False, "load_size": 512, "ret_pca": True}
    )
    assert ok.status_code == 200 and ok.json()["shape"] == [512, 694, 3]


def test_body_over_limit_is_413(clip_server):
    r = post(clip_server, "extract", {"image": "A" * (3 * 1024 * 1024)})
    assert r.status_code == 413 and "limit of 2097152 bytes" in r.json()["error"]["message"]


def test_bad_request_in_a_batch_does_not_fail_the_others(clip_server, rgb_image, good_png):
    """Truncated images pass the header check and fail in the worker, in the same batches as good ones."""
    truncated = b64(png_bytes(Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).resize((300, 300)))[:400])
    bodies = [{"image": truncated if i % 2 else good_png, "load_size": None} for i in range(16)]
    alone = post(clip_server, "extract", bodies[0]).json()
    want = cc.decode_features(alone["features"], alone["shape"])
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: post(clip_server, "extract", b), bodies))
    for i, r in enumerate(results):
        if i % 2:
            assert r.status_code == 400 and "truncated or corrupt" in r.json()["error"]["message"]
        else:
            assert r.status_code == 200 and r.json()["shape"] == [4, 5, 32]
            got = cc.decode_features(r.json()["features"], r.json()["shape"])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # what it answers alone


def test_server_still_serving_after_bad_inputs(clip_url, rgb_image):
    out = cc.extract_clip_features_decoded(rgb_image, load_size=None, base_url=clip_url, api_key=KEYS[0])
    assert out.shape == (4, 5, 32) and np.isfinite(out).all()


def test_keys_never_reach_the_log_and_info_level_prints_no_debug_lines(clip_server):
    """SECURITY.md: configured keys never appear in logs, not even of refused or malformed
    requests; --log-level info (conftest's) leaves out the debug lines that debug prints
    (test_server_options checks the other way)."""
    for key in KEYS:
        r = requests.post(
            clip_server.url + "/clip/encode_text",
            json={"text": key},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200
    wrong = "vs-wrong-key-in-the-log"
    for headers in ({"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Basic {KEYS[0]}"}):
        assert requests.get(clip_server.url + "/info", headers=headers).status_code == 401
    r = requests.post(
        clip_server.url + "/clip/encode_text", data=b"{", headers={"Authorization": f"Bearer {KEYS[1]}"}
    )
    assert r.status_code == 422
    log = clip_server.log()
    assert "POST /clip/encode_text" in log or "encode_text" in log, "the requests must be logged at all"
    for key in KEYS:
        assert key not in log
    assert "worker 0 (pid" not in log and " DEBUG " not in log
