"""Guards that need no server: answers with NaN/inf withheld, request withdrawal at the worker,
auto_mask compute and crop-layer checks, the blank-text rule and the HTTP protocol's limits."""

from __future__ import annotations

import base64
import json
import socket
import time

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from apis.clip.schemas import ClipSimilarityRequest, ClipTextRequest
from apis.core.encodings import encode_array, tensor_answer
from apis.core.errors import APIError
from apis.core.replies import Reply, non_finite_at
from apis.core.settings import Limits
from apis.http.schemas import is_blank
from apis.sam2.schemas import Sam2AutoMaskRequest, Sam2PromptRequest, auto_mask_points, generator_settings
from apis.sam3.schemas import Sam3PredictRequest
from apis.transport.dispatch import Withdraw, WorkerLink, frame
from apis.uvicorn_internals import http_protocol


@pytest.mark.parametrize(
    "answer",
    [
        {"score": float("nan")},
        {"results": [{"bbox": [1.0, float("inf"), 2.0, 3.0]}]},
        {"masks": [{"predicted_iou": 0.5}, {"predicted_iou": -float("inf")}]},
    ],
)
def test_an_answer_with_nan_or_inf_becomes_a_500_that_says_so(answer):
    reply = Reply.of(answer)
    assert reply.status == 500
    err = orjson.loads(reply.body)["error"]
    assert err["code"] == "non_finite_output" and "server fault" in err["message"]


def test_finite_answers_pass_untouched():
    answer = {"a": [1, 2.5, {"b": [0.0, -3e38]}], "s": "nan", "n": None}
    assert non_finite_at(answer) is None
    assert Reply.of(answer).body == orjson.dumps(answer)
    assert non_finite_at({"x": [[0.0, float("nan")]]}) == "answer.x[0][1]"


def test_tensors_with_nan_are_withheld_and_float16_overflow_is_the_requests_choice():
    with pytest.raises(APIError) as e:
        encode_array(np.array([1.0, np.nan], np.float32))
    assert e.value.status == 500 and e.value.code == "non_finite_output"
    with pytest.raises(APIError) as e:
        tensor_answer(np.array([np.inf], np.float32), "x", "float32", "npy")
    assert e.value.status == 500
    with pytest.raises(APIError) as e:
        encode_array(np.array([1e6], np.float32), "float16")
    assert e.value.status == 400 and "output_dtype=float32" in e.value.message
    assert encode_array(np.array([1e6], np.float32))[1] == [1]


def test_a_withdrawn_request_is_dropped_before_the_worker_collects_it():
    server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = WorkerLink(worker_end)
    for obj in [(1, time.monotonic(), "a"), (2, time.monotonic(), "b"), Withdraw(1), Withdraw(7)]:
        for part in frame(obj):
            server_end.sendall(part)
    assert [job for _, _, job in link.collect(8, 0.0, 1.0)] == ["b"]


def test_a_withdrawal_queued_behind_more_than_a_batch_is_still_seen():
    server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = WorkerLink(worker_end)
    for obj in [*((i, time.monotonic(), f"job-{i}") for i in range(5)), Withdraw(0), Withdraw(3)]:
        for part in frame(obj):
            server_end.sendall(part)
    assert [job for _, _, job in link.collect(2, 0.0, 1.0)] == ["job-1", "job-2"]
    assert [job for _, _, job in link.collect(2, 0.0, 1.0)] == ["job-4"]


def _auto(**fields) -> dict:
    return generator_settings(Sam2AutoMaskRequest(image="x", **fields))


def test_auto_mask_points_count_every_crop_of_every_layer():
    assert auto_mask_points(_auto(preset="coarse")) == 16 * 16
    assert auto_mask_points(_auto(preset="fine_grained")) == 64 * 64 + 4 * 32 * 32
    big = _auto(points_per_side=128, crop_n_layers=3, crop_n_points_downscale_factor=1)
    assert auto_mask_points(big) == 128 * 128 * (1 + 4 + 16 + 64)
    grids = _auto(
        preset="fine_grained", point_grids=[[[0.5, 0.5]] * 3, [[0.1, 0.1]] * 2], points_per_side=None
    )
    assert auto_mask_points(grids) == 3 + 4 * 2


@pytest.mark.parametrize(
    "fields",
    [
        {"crop_n_layers": 1, "crop_n_points_downscale_factor": 1000},
        {"points_per_side": 1, "crop_n_layers": 1, "crop_n_points_downscale_factor": 2},
        {"points_per_side": 7, "crop_n_layers": 3, "crop_n_points_downscale_factor": 2},
    ],
)
def test_crop_layers_without_points_are_refused_in_validation(fields):
    with pytest.raises(ValidationError, match="no points"):
        Sam2AutoMaskRequest(image="x", preset="coarse", **fields)
    Sam2AutoMaskRequest(image="x", preset="coarse", **{**fields, "crop_n_layers": 0})


def test_mask_input_must_be_finite_logits():
    def prompt(values) -> Sam2PromptRequest:
        data = base64.b64encode(np.array(values, "<f4").tobytes()).decode()
        return Sam2PromptRequest(image="x", mask_input=data, mask_input_shape=[1, 1, len(values)])

    prompt([-30.0, 12.5])
    for bad, words in (([np.nan, 0.0], "NaN"), ([0.0, -np.inf], "infinite"), ([2e4, 0.0], "within")):
        with pytest.raises(ValidationError, match=words):
            prompt(bad)


@pytest.mark.parametrize("text", ["", " ", "\t\n", "\u200b", "\u200c\u200d", "\ufeff ", "\u2060", "\x00"])
def test_blank_text_is_refused_on_every_route(text):
    assert is_blank(text)
    with pytest.raises(ValidationError):
        ClipTextRequest(text=text)
    with pytest.raises(ValidationError):
        ClipSimilarityRequest(image="x", text=text)
    with pytest.raises(ValidationError):
        ClipSimilarityRequest(image="x", text="mug", negatives=[text])
    with pytest.raises(ValidationError):
        Sam3PredictRequest(image="x", prompts=["mug", text])


@pytest.mark.parametrize("text", ["a", " mug ", "\u200bx", "日本"])
def test_text_with_something_visible_is_accepted(text):
    assert not is_blank(text)
    ClipTextRequest(text=text)
    Sam3PredictRequest(image="x", prompts=[text])


def test_clip_scales_are_bounded_so_softmax_cannot_overflow():
    for field in ("softmax", "relevancy_temperature"):
        with pytest.raises(ValidationError, match=field):
            ClipSimilarityRequest(image="x", text="mug", **{field: 1e308})
        ClipSimilarityRequest(image="x", text="mug", **{field: 100.0})


class _Transport:
    def __init__(self):
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def _protocol(limits: Limits):
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    cls = http_protocol(limits)
    loop = asyncio.new_event_loop()
    proto = cls(config=Config(app=None), server_state=ServerState(), app_state={}, _loop=loop)
    transport = _Transport()
    proto.connection_made(transport)
    return proto, transport, loop


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 2000 + b"\r\n\r\n", 431),
        (b"GET /" + b"u" * 600 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(11)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 1500, 431),  # headers never finished
        (b"NOPE!! / HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_the_protocol_refuses_big_heads_in_json(data, status):
    limits = Limits(max_header_bytes=1024, max_url_bytes=512, max_headers=10)
    proto, transport, loop = _protocol(limits)
    try:
        proto.data_received(data)
    finally:
        loop.close()
    head, _, body = transport.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and transport.closed
    assert b"content-type: application/json" in head
    assert json.loads(body)["error"]["code"] == "bad_http_request"


def test_an_unexpected_exception_is_answered_in_the_json_shape():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from apis.http.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("a bug")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "a bug" not in r.text


@pytest.mark.parametrize("which", [0, 2, None])
def test_keys_are_compared_in_constant_time_with_every_key(monkeypatch, which):
    """SECURITY.md: the token goes through hmac.compare_digest against every configured key,
    whichever matches (no early exit, no ``==``)."""
    import hmac

    from apis.http import middleware

    keys = ["vs-first", "vs-second", "vs-third"]
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    auth = middleware.BearerAuth(None, keys, lambda path: False)
    token = keys[which] if which is not None else "vs-nope"
    problem = auth._problem(b"Bearer " + token.encode())
    assert (problem is None) is (which is not None)
    assert seen == [(token.encode(), k.encode()) for k in keys]


def test_default_limits_are_the_numbers_security_md_states():
    """SECURITY.md's "On and off by default" table, number by number."""
    mib = 1024 * 1024
    want = {
        "max_body_bytes": 64 * mib,
        "max_image_pixels": 40_000_000,
        "max_image_side": 16384,
        "max_response_bytes": 256 * mib,
        "max_text_chars": 2000,
        "max_tokens": 32768,
        "max_embed_inputs": 64,
        "max_auto_mask_points": 65536,
        "body_timeout_s": 60,
        "max_header_bytes": 32 * 1024,
        "max_headers": 100,
        "max_url_bytes": 8 * 1024,
    }
    got = Limits().model_dump()
    assert {k: got[k] for k in want} == want


def test_the_auth_header_limit_is_4_kib_and_spaces_around_the_key_are_trimmed():
    """SECURITY.md: surrounding spaces are trimmed, headers over 4 KiB are refused (4096 bytes
    pass, 4097 do not), and each failure says what was wrong."""
    from apis.http import middleware

    auth = middleware.BearerAuth(None, ["vs-key"], lambda path: False)

    def header(size: int) -> bytes:
        return (b"Bearer  vs-key \t").ljust(size, b" ")

    assert auth._problem(header(4096)) is None
    assert auth._problem(header(4097)) == "Authorization header is too long"
    assert auth._problem(b"Bearer \t vs-key  ") is None
    assert auth._problem(b"Bearer vs-key2") == auth._problem(b"Bearer vs-ke") == "invalid API key"
    assert auth._problem(b"Bearer ") == "invalid API key"
    assert "missing" in auth._problem(None) and "Bearer scheme" in auth._problem(b"Basic vs-key")


def test_the_switches_and_bounds_are_the_ones_security_md_states():
    """SECURITY.md's defaults beyond the limits table: URL and path inputs off, private targets
    refused, 3 redirects, docs and metrics behind the key; the six image formats, 10,000 header
    steps; softmax scales up to 10^8 and mask_input logits within 10^4, by their exact bounds."""
    from apis.config import ServerConfig
    from apis.core import images
    from apis.core.settings import Inputs

    inputs = Inputs()
    assert (inputs.url.enabled, inputs.url.allow_private_networks, inputs.url.allowed_hosts) == (
        False,
        False,
        [],
    )
    assert inputs.url.max_redirects == 3 and inputs.path.roots == []
    cfg = ServerConfig()
    assert (cfg.public_docs, cfg.public_metrics, cfg.metrics_port) == (False, False, None)
    assert set(images.ALLOWED_FORMATS) == {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    assert images.HEADER_STEPS == 10_000
    for field in ("softmax", "relevancy_temperature"):
        ClipSimilarityRequest(image="x", text="mug", **{field: 1e8})
        with pytest.raises(ValidationError):
            ClipSimilarityRequest(image="x", text="mug", **{field: 1.000001e8})

    def prompt(value: float) -> Sam2PromptRequest:
        data = base64.b64encode(np.array([value, -value], "<f4").tobytes()).decode()
        return Sam2PromptRequest(image="x", mask_input=data, mask_input_shape=[1, 1, 2])

    prompt(1e4)
    with pytest.raises(ValidationError, match="within"):
        prompt(10001.0)
