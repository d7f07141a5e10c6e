"""The clients' shared request code (clients/common.py) against a recording HTTP server: each
function's JSON body is its own parameters, the connection ones travel apart."""

from __future__ import annotations

import hashlib
import http.server
import inspect
import json
import threading

import pytest

from clients import clip_client, dino_client, rmbg_client, sam2_client
from clients.common import encode_image

CONNECTION = {"base_url", "api_key", "timeout", "image_url", "image_path", "image_id"}
FILE = b"\x89PNG not really"
PNG = encode_image(FILE)
ZERO = encode_image(bytes(4))  # one float32 0.0, enough for the prompt-mask answer to decode
REPLY = {"masks": ZERO, "masks_shape": [1, 1, 1], "iou_predictions": ZERO, "iou_shape": [1],
         "low_res_masks": ZERO, "low_res_shape": [1, 1, 1], "probabilities": [1.0]}  # fmt: skip


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, dict, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(REPLY).encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _request(fn, url: str, route: str, image=PNG, **kwargs) -> tuple[dict, dict]:
    _Recorder.seen.clear()
    family = fn.__module__.split(".")[-1].removesuffix("_client")
    fn(image=image, base_url=f"{url}/{family}", api_key="k", **kwargs)
    ((path, headers, body),) = _Recorder.seen
    assert path == f"/{family}/{route}"
    assert headers["Authorization"] == "Bearer k"
    return headers, body


@pytest.mark.parametrize(
    "fn, route",
    [
        (clip_client.extract_clip_features, "extract"),
        (clip_client.compute_clip_similarity, "similarity"),
        (dino_client.extract_dino_features, "extract"),
        (sam2_client.generate_sam2_auto_masks, "auto_mask"),
        (sam2_client.generate_sam2_prompt_masks, "prompt_mask"),
    ],
)
def test_the_body_is_the_functions_parameters_with_their_defaults(url, fn, route):
    headers, body = _request(fn, url, route)
    params = inspect.signature(fn).parameters
    assert body == {
        **{name: p.default for name, p in params.items() if name not in CONNECTION | {"image"}},
        "image": PNG,
    }
    # Only the families that cache images send the key that load balancers hash on.
    key = hashlib.sha256(FILE).hexdigest()
    assert headers.get("X-Image-Key") == (key if fn.__module__.endswith("sam2_client") else None)


def test_arguments_the_caller_changed_reach_the_body(url):
    _, body = _request(sam2_client.generate_sam2_prompt_masks, url, "prompt_mask", box=[1, 2, 3, 4])
    assert body["box"] == [1, 2, 3, 4] and body["point_coords"] is None
    _, body = _request(clip_client.classify_clip, url, "classify", image=FILE, labels=("a", "b"))
    assert body == {"image": PNG, "labels": ["a", "b"], "templates": None, "model_name": None,
                    "model_pretrained": None}  # fmt: skip


def test_drop_none_leaves_unset_fields_to_the_server(url):
    _, body = _request(rmbg_client.remove_background_response, url, "remove", output="mask")
    assert body == {"image": PNG, "output": "mask", "output_format": "png"}
