"""Embed once, prompt many: /sam2/embed, /sam3/embed and ``image_id`` in place of the image.

Real servers with the tiny SAM 2.1 / SAM 3 checkpoints of the family tests; answers on an
image_id are compared with sam2's predictor and with the same request carrying the image.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import numpy as np
import pytest
import requests

from clients import sam2_client as sc
from clients.common import VisionServeError, encode_image, image_file_bytes, post
from clients.sam3_client import Sam3ServiceClient
from tests.conftest import KEYS, ServerProcess
from tests.http.test_sam2_http import ARCH as SAM2_ARCH
from tests.http.test_sam2_http import assert_same_answer, direct, reference, sam2_checkpoint, scene  # noqa: F401
from tests.http.test_sam3_http import ARCH as SAM3_ARCH
from tests.http.test_sam3_http import sam3_checkpoint  # noqa: F401
from tests.http.test_sam3_http import scene as scene3

CLICK = {"point_coords": [[30, 20]], "point_labels": [1]}
MODEL = "sam2.1_hiera_t"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def id_server(tmp_path_factory, sam2_checkpoint, sam3_checkpoint):  # noqa: F811
    """SAM 2 and SAM 3 in one server (one start): caches and counters are per family."""
    sam2 = {"name": MODEL, "weights": str(sam2_checkpoint), "arch_config": str(SAM2_ARCH)}
    sam3 = {"name": "sam3-tiny", "weights": str(sam3_checkpoint), "arch_config": str(SAM3_ARCH)}
    config = {
        "sam2": {"max_batch_size": 8, "batch_timeout": 0.05, "cache_size": 3, "models": [sam2]},
        "sam3": {"max_batch_size": 8, "cache_size": 2, "models": [sam3]},
    }
    server = ServerProcess(config, tmp_path_factory.mktemp("sam-id"), ["--api-key", KEYS[0]])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def sam2_server(id_server):
    return id_server


@pytest.fixture
def kw(sam2_server):
    return {"base_url": sam2_server.url + "/sam2", "api_key": KEYS[0]}


def workers(server, family: str) -> list[dict]:
    body = requests.get(server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    return body["families"][family]["workers"]


def encoded(server, family: str = "sam2", model: str = MODEL) -> int:
    return sum(w["encoded_images"][model] for w in workers(server, family))


def test_embed_answers_the_file_hash_and_prompts_on_the_id_equal_the_predictor(sam2_server, kw, reference):  # noqa: F811
    image = scene(seed=11)
    png = image_file_bytes(image)
    before = encoded(sam2_server)
    first = sc.embed_sam2_image(png, **kw)
    assert first == {"image_id": sha256(png), "width": 96, "height": 72, "cached": False, "model": MODEL}
    assert sc.image_id(image) == sc.image_id(png) == first["image_id"]
    assert sc.embed_sam2_image(png, **kw)["cached"] is True
    for prompt in (CLICK, {"box": [10, 10, 60, 50]}, {**CLICK, "multimask_output": False}):
        got = sc.generate_sam2_prompt_masks(image_id=first["image_id"], **prompt, **kw)
        assert_same_answer(got, direct(reference, image, **prompt))
    with_image = sc.generate_sam2_prompt_masks(image=encode_image(png), **CLICK, **kw)
    np.testing.assert_array_equal(
        with_image[2], sc.generate_sam2_prompt_masks(image_id=first["image_id"], **CLICK, **kw)[2]
    )
    assert encoded(sam2_server) == before + 1  # one encoder run for all of it


def test_auto_mask_on_an_image_id_equals_auto_mask_on_the_image(kw):
    png = image_file_bytes(scene(seed=12))
    loose = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "points_per_side": 6}
    # the image's first request is an auto_mask: its embedding keeps the file for the next ones
    first = sc.generate_sam2_auto_masks(image=encode_image(png), preset="coarse", **loose, **kw)
    image_id = sc.embed_sam2_image(png, **kw)["image_id"]
    assert sc.embed_sam2_image(png, **kw)["cached"] is True
    assert sc.generate_sam2_auto_masks(image_id=image_id, preset="coarse", **loose, **kw) == first
    for layers in (0, 1):  # crops need the pixels: the worker decodes the file it cached
        by_id = sc.generate_sam2_auto_masks(
            image_id=image_id, preset="coarse", crop_n_layers=layers, **loose, **kw
        )
        by_image = sc.generate_sam2_auto_masks(
            image=encode_image(png), preset="coarse", crop_n_layers=layers, **loose, **kw
        )
        assert by_id["num_masks"] > 0 and by_id == by_image


@pytest.mark.parametrize(
    "body, status, code, needle",
    [
        ({"image_id": "0" * 64, **CLICK}, 404, "image_not_cached", "send the image itself again"),
        ({"image_id": "xyz" + "0" * 61, **CLICK}, 422, "validation_error", "64 hex digits"),
        ({"image_id": "ab" * 16, **CLICK}, 422, "validation_error", "got 32 characters"),
        ({"image_id": "0" * 64, "image": "AAAA", **CLICK}, 422, "validation_error", "exactly one of"),
    ],
)
def test_bad_or_unknown_image_ids_get_a_clear_4xx(kw, body, status, code, needle):
    for route in ("prompt_mask", "auto_mask"):
        payload = body if route == "prompt_mask" else {k: v for k, v in body.items() if k not in CLICK}
        with pytest.raises(VisionServeError) as err:
            post("sam2", route, payload, **kw)
        assert (err.value.status, err.value.code) == (status, code) and needle in err.value.message
        if code == "image_not_cached":
            assert err.value.param == "image_id" and "/sam2/embed" in err.value.message


def test_prompts_on_an_image_id_are_checked_against_the_cached_size(kw):
    image_id = sc.embed_sam2_image(scene(seed=13), **kw)["image_id"]
    with pytest.raises(VisionServeError) as err:
        sc.generate_sam2_prompt_masks(image_id=image_id, point_coords=[[97, 5]], point_labels=[1], **kw)
    assert err.value.status == 400 and "outside the 96x72 image" in err.value.message
    assert err.value.param == "point_coords"


def test_an_evicted_image_is_resent_by_the_client_by_itself(sam2_server, kw, reference):  # noqa: F811
    image = scene(seed=14)
    image_id = sc.embed_sam2_image(image, **kw)["image_id"]
    for seed in range(20, 23):  # cache_size 3: three other images push it out
        sc.embed_sam2_image(scene(seed=seed), **kw)
    with pytest.raises(VisionServeError) as err:  # the id alone cannot be answered now
        sc.generate_sam2_prompt_masks(image_id=image_id, **CLICK, **kw)
    assert err.value.code == "image_not_cached"
    before = encoded(sam2_server)
    got = sc.sam2_point_mask(image, image_id=image_id, **CLICK, **kw)  # the image comes along
    assert_same_answer(got, direct(reference, image, **CLICK))
    assert encoded(sam2_server) == before + 1
    again = sc.generate_sam2_prompt_masks(image_id=image_id, **CLICK, **kw)  # cached again
    assert_same_answer(again, got)
    assert encoded(sam2_server) == before + 1


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Recorder.seen.append((self.path, dict(self.headers), body))
        if "image_id" in body:  # as a server that evicted it
            answer, status = {"error": {"message": "gone", "code": "image_not_cached"}}, 404
        else:
            answer, status = {"image_id": "x", "image_size": {"width": 1, "height": 1}, "results": []}, 200
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_clients_send_the_image_id_as_x_image_key_on_every_request():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        png = image_file_bytes(scene3(seed=3))
        client = Sam3ServiceClient(url + "/sam3", api_key="k")
        client.embed(image=png)
        client.predict(prompts=["a"], image=png, image_id=sha256(png))  # 404, then with the image
        with pytest.raises(VisionServeError):
            sc.generate_sam2_prompt_masks(image_id="ab" * 32, **CLICK, base_url=url + "/sam2", api_key="k")
    finally:
        httpd.shutdown()
    (p1, h1, b1), (p2, h2, b2), (p3, h3, b3), (p4, h4, b4) = _Recorder.seen
    assert [p1, p2, p3, p4] == ["/sam3/embed", "/sam3/predict", "/sam3/predict", "/sam2/prompt_mask"]
    assert h1["X-Image-Key"] == h2["X-Image-Key"] == h3["X-Image-Key"] == sha256(png)
    assert h4["X-Image-Key"] == "ab" * 32
    assert "image" in b1 and b2.keys() >= {"image_id", "prompts"} and "image" not in b2
    assert "image_id" not in b3 and b3["image"] == encode_image(png)


# ----------------------------------------------------------------------------- SAM 3


@pytest.fixture
def sam3_server(id_server):
    return id_server


def test_sam3_predict_on_an_image_id_equals_predict_on_the_image_and_recovers_from_eviction(sam3_server):
    client = Sam3ServiceClient(sam3_server.url + "/sam3", api_key=KEYS[0])
    png = image_file_bytes(scene3(seed=5))
    emb = client.embed(image=png)
    assert emb == {"image_id": sha256(png), "width": 45, "height": 61, "cached": False, "model": "sam3-tiny"}
    prompts = ["a red car", "tree"]
    by_image = client.predict(prompts=prompts, image=png, return_masks=True)
    by_id = client.predict(prompts=prompts, image_id=emb["image_id"], return_masks=True)
    assert by_id == by_image and by_id["results"]
    before = encoded(sam3_server, "sam3", "sam3-tiny")
    for seed in (6, 7):  # cache_size 2
        client.embed(image=scene3(seed=seed))
    with pytest.raises(VisionServeError) as err:
        client.predict(prompts=prompts, image_id=emb["image_id"])
    assert (err.value.status, err.value.code) == (
        404,
        "image_not_cached",
    ) and "/sam3/embed" in err.value.message
    assert client.predict(prompts=prompts, image_id=emb["image_id"], image=png, return_masks=True) == by_image
    assert encoded(sam3_server, "sam3", "sam3-tiny") == before + 3
    with pytest.raises(VisionServeError) as err:
        client.predict(prompts=prompts, image_id="g" * 64)
    assert err.value.status == 422 and "64 hex digits" in err.value.message
