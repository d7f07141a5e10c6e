"""What production throws at the server: a bad-input matrix over every POST route, auth on every
route, SSRF and path safety over HTTP, body and pixel limits, and a mixed-route soak.

One server runs every family of configs/demo.yaml (tiny real models, random weights) with URL
input allow-listed to 127.0.0.1 (the test image host), path input rooted at a test folder and a
4 MiB body limit. Worker faults and clean shutdown are in test_lifecycle.py.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml
from PIL import Image

from tests.conftest import KEYS, ROOT, ServerProcess

DEMO = ROOT / "configs" / "demo.yaml"
BODY_LIMIT = 4 * 1024 * 1024
SOAK_SECONDS = float(os.environ.get("VISIONSERVE_SOAK_SECONDS", "180"))


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def photo(w: int = 61, h: int = 45, seed: int = 3) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


GOOD = photo()
GOOD_B64 = b64(png(GOOD))
TRUNCATED_B64 = b64(png(photo(200, 150))[:-400])

# A good body for each POST route; cases below change or replace fields.
ROUTES: dict[str, dict] = {
    "clip/extract": {"image": GOOD_B64, "load_size": 224},
    "clip/encode_text": {"text": "a red mug"},
    "clip/similarity": {"image": GOOD_B64, "text": "a red mug", "load_size": 224},
    "dino/extract": {"image": GOOD_B64},
    "sam2/prompt_mask": {"image": GOOD_B64, "point_coords": [[20, 20]], "point_labels": [1]},
    "sam2/auto_mask": {"image": GOOD_B64, "preset": "coarse", "points_per_side": 4},
    "sam3/predict": {"image": GOOD_B64, "prompts": ["mug"]},
    "rmbg/remove": {"image": GOOD_B64},
}
IMAGE_ROUTES = [r for r in ROUTES if "image" in ROUTES[r]]


def spliced(route: str, fragment: str) -> str:
    """The route's good body as JSON text with ``fragment`` (what json.dumps would not write) added;
    a later duplicate key wins in Python's JSON parser."""
    return json.dumps(ROUTES[route])[:-1] + ", " + fragment + "}"


DROP = object()  # a field value meaning "leave the field out"

# (route, changes to the good body | raw body text, status, words the message must contain)
IMAGE_CASES = {
    "broken base64": ({"image": "iVBORw0KGgo%%%"}, 400, "not valid base64"),
    "non-image bytes": ({"image": b64(b"GIF89a? no, just text")}, 400, "not an image format"),
    "truncated image": ({"image": TRUNCATED_B64}, 400, "truncated or corrupt"),
    "decompression bomb": ({"image": b64(bomb_png(30000, 30000))}, 413, "downscale it"),
    "huge side": ({"image": b64(bomb_png(20000, 1))}, 413, "px per side"),
    "no image": ({"image": DROP}, 422, "send exactly one of"),
    "two images": ({"image_path": "photo.png"}, 422, "send exactly one of"),
    "image not a string": ({"image": 12345}, 422, "image"),
    "empty image": ({"image": ""}, 400, "empty"),
    "bad data URI": ({"image": "data:image/png," + GOOD_B64}, 400, "data URI"),
    "unknown field": ({"imagee": GOOD_B64}, 422, "imagee"),
}
ROUTE_CASES: list[tuple[str, object, int, str]] = [
    ("clip/extract", {"load_size": "big"}, 422, "load_size"),
    ("clip/extract", {"load_size": 4000}, 400, "use a smaller load_size"),
    ("clip/extract", {"output_dtype": "float64"}, 422, "output_dtype"),
    ("clip/extract", {"model_name": "ViT-Z-99"}, 400, "offers"),
    ("clip/extract", {"pca_niter": 0}, 422, "pca_niter"),
    ("clip/encode_text", {"text": ""}, 422, "text"),
    ("clip/encode_text", {"text": "x" * 5000}, 400, "characters"),
    ("clip/encode_text", {"text": ["a", "b"]}, 422, "text"),
    ("clip/encode_text", '{"text": "unterminated', 422, "JSON"),
    ("clip/encode_text", "[1, 2, 3]", 422, "object"),
    ("clip/encode_text", "", 422, "body"),
    ("clip/similarity", spliced("clip/similarity", '"softmax": NaN'), 422, "softmax"),
    ("clip/similarity", {"similarity": "euclid"}, 422, "similarity"),
    ("clip/similarity", {"negatives": ["x"] * 1000}, 422, "negatives"),
    ("clip/similarity", {"relevancy_temperature": -1}, 422, "relevancy_temperature"),
    ("dino/extract", {"stride": 0}, 422, "stride"),
    ("dino/extract", {"stride": 5}, 400, "stride"),
    ("dino/extract", {"facet": "attention"}, 422, "facet"),
    ("dino/extract", {"layer": 99}, 400, "layer"),
    ("dino/extract", {"model_type": "dinov3_vitl16"}, 400, "offers"),
    ("dino/extract", {"tensor_format": "NHWC"}, 422, "tensor_format"),
    ("sam2/prompt_mask", {"point_labels": [2]}, 422, "point_labels"),
    (
        "sam2/prompt_mask",
        spliced("sam2/prompt_mask", '"point_coords": [[Infinity, 3]]'),
        422,
        "point_coords",
    ),
    ("sam2/prompt_mask", {"point_coords": [[1, 1]] * 5000, "point_labels": [1] * 5000}, 422, "point_coords"),
    (
        "sam2/prompt_mask",
        {"box": [30, 30, 10, 10], "point_coords": DROP, "point_labels": DROP},
        422,
        "x1 <= x2",
    ),
    ("sam2/prompt_mask", {"point_coords": [[500, 20]]}, 400, "is outside"),
    ("sam2/prompt_mask", {"mask_input": "AAAA", "mask_input_shape": [1, 256, 256]}, 400, "mask_input"),
    ("sam2/auto_mask", {"preset": "ultra"}, 422, "preset"),
    ("sam2/auto_mask", {"points_per_side": 0}, 422, "points_per_side"),
    ("sam2/auto_mask", {"points_per_side": 100000}, 422, "points_per_side"),
    ("sam2/auto_mask", {"point_grids": [[[2.0, 0.5]]], "points_per_side": DROP}, 4, "point"),
    ("sam3/predict", {"prompts": []}, 422, "prompts"),
    ("sam3/predict", {"prompts": [""]}, 422, "prompt"),
    ("sam3/predict", {"prompts": ["cup"] * 1000}, 422, "prompts"),
    ("sam3/predict", {"mask_format": "bmp"}, 422, "mask_format"),
    (
        "sam3/predict",
        spliced("sam3/predict", '"score_threshold": -Infinity'),
        422,
        "score_threshold",
    ),
    ("sam3/predict", {"score_threshold": 5}, 422, "score_threshold"),
    ("sam3/predict", {"prompts": "cup"}, 422, "prompts"),
    ("rmbg/remove", {"threshold": -1}, 422, "threshold"),
    ("rmbg/remove", {"output": "alpha"}, 422, "output"),
    ("rmbg/remove", {"output_format": "gif"}, 422, "output_format"),
    ("rmbg/remove", {"model": "rmbg-9"}, 400, "offers"),
]
CASES = {
    **{f"{r} {name}": (r, *case) for r in IMAGE_ROUTES for name, case in IMAGE_CASES.items()},
    **{f"{r} {i}": (r, body, status, words) for i, (r, body, status, words) in enumerate(ROUTE_CASES)},
}


def body_of(route: str, change) -> str | dict:
    if isinstance(change, str):
        return change
    merged = {**ROUTES[route], **change}
    return {k: v for k, v in merged.items() if v is not DROP}


def send(url: str, route: str, body, key: str = KEYS[0], timeout: float = 60) -> requests.Response:
    headers = {**auth(key), "Content-Type": "application/json"}
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/{route}", data=data, headers=headers, timeout=timeout)


# --------------------------------------------------------------------------- servers


class _Images(http.server.SimpleHTTPRequestHandler):
    """Serves the image root, plus /redirect?to=<url> (302) for the SSRF cases."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", self.path.split("=", 1)[1])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    """(image root, a folder outside it) with a photo in each."""
    base = tmp_path_factory.mktemp("hardening")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    GOOD.save(root / "photo.png")
    GOOD.save(outside / "secret.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "dev").symlink_to("/dev/zero")
    (root / "inside-link.png").symlink_to(root / "photo.png")
    (root / "folder").mkdir()
    os.mkfifo(root / "fifo.png")
    return root, outside


@pytest.fixture(scope="module")
def host(roots):
    root = roots[0]
    handler = lambda *a, **kw: _Images(*a, directory=str(root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def demo_config(**inputs) -> dict:
    cfg = yaml.safe_load(DEMO.read_text())
    for family in ("clip", "dino", "sam2", "sam3", "rmbg"):
        for m in cfg[family]["models"]:
            if m.get("arch_config"):
                m["arch_config"] = str(DEMO.parent / m["arch_config"])
    cfg["limits"] = {
        "max_body_bytes": BODY_LIMIT,
        "max_image_pixels": 4_000_000,
        "max_image_side": 4096,
        "max_response_bytes": 16 * 1024 * 1024,
    }
    cfg["inputs"] = inputs
    return cfg


@pytest.fixture(scope="module")
def server(tmp_path_factory, roots):
    cfg = demo_config(
        url={"enabled": True, "allowed_hosts": ["127.0.0.1"], "timeout_s": 5},
        path={"roots": [str(roots[0])]},
    )
    proc = ServerProcess(cfg, tmp_path_factory.mktemp("all"), ["--api-key", KEYS[0], "--api-key", KEYS[1]])
    try:
        yield proc.wait_ready(300)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def first_answers(server) -> dict[str, dict]:
    """Each route's answer to its good body before any bad input was sent (the demo models are
    deterministic, so later answers must be the same)."""
    return {route: send(server.url, route, body).json() for route, body in ROUTES.items()}


def server_errors(url: str) -> int:
    info = requests.get(url + "/info", headers=auth(), timeout=10).json()
    return sum(c.get("server_error", 0) for f in info["families"].values() for c in f["requests"].values())


# --------------------------------------------------------------------------- bad input


def test_the_matrix_is_big_enough():
    assert len(CASES) >= 60 and {c[0] for c in CASES.values()} == set(ROUTES)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_4xx_that_says_what_to_fix(server, first_answers, case):
    route, change, status, words = CASES[case]
    r = send(server.url, route, body_of(route, change))
    if status == 4:  # a 400 or a 422, depending on where the check lives
        assert 400 <= r.status_code < 500, r.text
    else:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), err
    assert err["type"] in ("invalid_request_error", "request_too_large")


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_answers_after_the_matrix_and_no_5xx_was_counted(server, first_answers, route):
    r = send(server.url, route, ROUTES[route])
    assert r.status_code == 200, r.text
    assert r.json() == first_answers[route]  # the same answer as before the bad inputs
    assert server_errors(server.url) == 0


@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_bad_requests_in_a_batch_do_not_fail_the_good_ones(server, route):
    """Truncated images pass the header check and fail while the worker decodes the batch."""
    good = [send(server.url, route, ROUTES[route]).json()]
    bodies = [ROUTES[route], {**ROUTES[route], "image": TRUNCATED_B64}] * 4
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: send(server.url, route, b), bodies))
    for body, r in zip(bodies, answers, strict=True):
        if body["image"] == TRUNCATED_B64:
            assert r.status_code == 400 and "truncated" in r.json()["error"]["message"]
        else:
            assert r.status_code == 200 and r.json() == good[0]


def _exif_rotated() -> bytes:
    img = photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: decoded as 20 x 40
    return png(img, format="JPEG", exif=exif.tobytes())


def _animated() -> bytes:
    frames = [photo(seed=s).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


UNUSUAL = {
    "grayscale": (png(GOOD.convert("L")), (61, 45)),
    "palette": (png(GOOD.convert("P")), (61, 45)),
    "rgba": (png(GOOD.convert("RGBA")), (61, 45)),
    "cmyk jpeg": (png(GOOD.convert("CMYK"), format="JPEG"), (61, 45)),
    "16-bit": (png(Image.fromarray((np.arange(45 * 61).reshape(45, 61) * 20).astype(np.uint16))), (61, 45)),
    "animated gif": (_animated(), (61, 45)),
    "exif rotated": (_exif_rotated(), (20, 40)),
    "1x1": (png(photo(1, 1)), (1, 1)),
    "webp": (png(GOOD, format="WEBP", lossless=True), (61, 45)),
}


@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_but_valid_images_are_answered_at_their_decoded_size(server, kind):
    data, (w, h) = UNUSUAL[kind]
    rm = send(server.url, "rmbg/remove", {"image": b64(data)})
    assert rm.status_code == 200, rm.text
    assert (rm.json()["width"], rm.json()["height"]) == (w, h)
    sam3 = send(server.url, "sam3/predict", {"image": b64(data), "prompts": ["thing"]})
    assert sam3.status_code == 200, sam3.text
    assert sam3.json()["image_size"] == {"width": w, "height": h}
    feats = send(server.url, "dino/extract", {"image": b64(data), "load_size": 28})
    assert feats.status_code == 200, feats.text
    rw, rh = (28, int(28 * h / w)) if w <= h else (int(28 * w / h), 28)  # shorter side -> 28
    assert feats.json()["shape"][:2] == [-(-rh // 14), -(-rw // 14)]  # padded to multiples of 14


# --------------------------------------------------------------------------- auth


AUTH_CASES = {
    "missing header": ({}, "missing Authorization header"),
    "wrong scheme": ({"Authorization": f"Basic {KEYS[0]}"}, "Bearer scheme"),
    "no scheme": ({"Authorization": KEYS[0]}, "Bearer scheme"),
    "wrong key": ({"Authorization": "Bearer vs-not-the-key"}, "invalid API key"),
    "key with inner space": ({"Authorization": f"Bearer {KEYS[0][:4]} {KEYS[0][4:]}"}, "invalid API key"),
    "key prefix": ({"Authorization": f"Bearer {KEYS[0][:-1]}"}, "invalid API key"),
    "very long header": ({"Authorization": "Bearer " + "k" * 6000}, "too long"),
}


@pytest.mark.parametrize("case", AUTH_CASES)
@pytest.mark.parametrize("route", ROUTES)
def test_every_route_refuses_a_bad_key_before_reading_the_body(server, route, case):
    headers, words = AUTH_CASES[case]
    r = requests.post(f"{server.url}/{route}", json=ROUTES[route], headers=headers, timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_any_configured_key_works_and_surrounding_spaces_are_trimmed(server, first_answers, route):
    r = requests.post(
        f"{server.url}/{route}", json=ROUTES[route], headers={"Authorization": f"Bearer  {KEYS[1]}  "}
    )
    assert r.status_code == 200, r.text
    assert r.json() == first_answers[route]


def test_a_header_too_big_for_the_http_parser_is_refused_not_crashed(server):
    r = requests.post(
        f"{server.url}/clip/encode_text",
        json={"text": "x"},
        headers={"Authorization": "Bearer " + "k" * 200_000},
    )
    assert 400 <= r.status_code < 500
    assert send(server.url, "clip/encode_text", {"text": "x"}).status_code == 200


def test_health_is_open_info_and_docs_need_a_key(server):
    assert requests.get(server.url + "/health").status_code == 200
    for family in ("clip", "dino", "sam2", "sam3", "rmbg"):
        assert requests.get(f"{server.url}/{family}/health").json()["status"] == "ok"
    for path in ("/info", "/docs", "/openapi.json"):
        assert requests.get(server.url + path).status_code == 401
        assert requests.get(server.url + path, headers=auth(KEYS[1])).status_code == 200


# --------------------------------------------------------------------------- SSRF


def test_public_docs_opens_the_docs_but_not_info(open_url_server):
    for path in ("/docs", "/openapi.json"):
        assert requests.get(open_url_server.url + path).status_code == 200
    assert requests.get(open_url_server.url + "/info").status_code == 401
    assert requests.post(open_url_server.url + "/rmbg/remove", json=ROUTES["rmbg/remove"]).status_code == 401


@pytest.fixture(scope="module")
def open_url_server(tmp_path_factory):
    """URL input on with no allow-list (any public host, nothing private); public docs."""
    cfg = {
        "inputs": {"url": {"enabled": True, "timeout_s": 3}},
        "public_docs": True,
        "rmbg": demo_config()["rmbg"],
    }
    proc = ServerProcess(cfg, tmp_path_factory.mktemp("open-url"), ["--api-key", KEYS[0]])
    try:
        yield proc.wait_ready(120)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://127.1/x.png",  # short form of 127.0.0.1
        "http://2130706433/x.png",  # 127.0.0.1 as one number
        "http://0.0.0.0/x.png",
        "http://localhost/x.png",  # a name that resolves to loopback
        "http://[::1]/x.png",
        "http://10.0.0.1/x.png",
        "http://172.16.5.4/x.png",
        "http://192.168.1.1/x.png",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fd00::1]/x.png",
        "http://100.64.0.1/x.png",  # carrier-grade NAT
    ],
)
def test_non_public_targets_are_refused(open_url_server, url):
    r = send(open_url_server.url, "rmbg/remove", {"image_url": url})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "url_not_allowed"
    assert "non-public address" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1:70/",
        "data:image/png;base64,AAAA",
        "http:///x.png",
        "//127.0.0.1/x.png",
    ],
)
def test_non_http_urls_are_refused(server, url):
    r = send(server.url, "rmbg/remove", {"image_url": url})
    assert r.status_code == 400 and "http:// or https://" in r.json()["error"]["message"]


def test_the_allow_list_lets_its_hosts_through_and_nothing_else(server, host):
    r = send(server.url, "rmbg/remove", {"image_url": f"{host}/photo.png"})
    assert r.status_code == 200 and r.json()["width"] == 61
    for url in ("http://10.1.2.3/x.png", "http://93.184.216.34/x.png", "http://127.0.0.2/x.png"):
        r = send(server.url, "rmbg/remove", {"image_url": url})
        assert r.status_code == 400 and "allow-list" in r.json()["error"]["message"], url


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("http://169.254.169.254/latest/meta-data/", "allow-list"),
        ("http://10.0.0.7/x.png", "allow-list"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http://127.0.0.1:1/photo.png", "could not fetch"),  # allowed host, closed port
    ],
)
def test_redirects_are_checked_like_the_first_url(server, host, target, words):
    r = send(server.url, "rmbg/remove", {"image_url": f"{host}/redirect?to={target}"})
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_a_redirect_to_an_allowed_url_is_followed_and_loops_are_cut(server, host):
    r = send(server.url, "rmbg/remove", {"image_url": f"{host}/redirect?to={host}/photo.png"})
    assert r.status_code == 200 and r.json()["height"] == 45
    loop = f"{host}/redirect?to={host}/redirect?to={host}/redirect?to={host}/redirect?to={host}/photo.png"
    r = send(server.url, "rmbg/remove", {"image_url": loop})
    assert r.status_code == 400 and "redirected more than" in r.json()["error"]["message"]


# --------------------------------------------------------------------------- image_path


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("../outside/secret.png", "inside one of the server's image roots"),
        ("folder/../../outside/secret.png", "inside one of the server's image roots"),
        ("/etc/passwd", "inside one of the server's image roots"),
        ("escape.png", "inside one of the server's image roots"),  # symlink leaving the root
        ("dev", "inside one of the server's image roots"),  # symlink to /dev/zero
        ("/dev/zero", "inside one of the server's image roots"),
        ("fifo.png", "not a regular file"),
        ("folder", "not a regular file"),
        ("missing.png", "does not exist"),
        ("photo.png\x00.txt", "NUL"),
    ],
)
def test_paths_outside_the_roots_links_and_devices_are_refused(server, path, words):
    r = send(server.url, "sam3/predict", {"image_path": path, "prompts": ["mug"]}, timeout=20)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_files_inside_the_roots_work_by_relative_absolute_and_linked_path(server, roots):
    want = send(server.url, "rmbg/remove", {"image": GOOD_B64}).json()
    for path in ("photo.png", str(roots[0] / "photo.png"), "inside-link.png", "folder/../photo.png"):
        r = send(server.url, "rmbg/remove", {"image_path": path})
        assert r.status_code == 200 and r.json() == want, path


# --------------------------------------------------------------------------- limits


def _raw_post(url: str, head: dict, parts: list[bytes], wait: float = 10) -> tuple[int, bytes]:
    """POST /clip/encode_text over a plain socket: headers, then ``parts``, while another thread
    reads the answer (the server may answer and close before the body is all sent)."""
    host, port = url.removeprefix("http://").split(":")
    answer = bytearray()
    with socket.create_connection((host, int(port)), timeout=wait) as s:

        def read() -> None:
            try:
                while chunk := s.recv(65536):
                    answer.extend(chunk)
            except OSError:
                pass

        reader = threading.Thread(target=read)
        reader.start()
        lines = "".join(
            f"{k}: {v}\r\n" for k, v in {**auth(), "Content-Type": "application/json", **head}.items()
        )
        try:
            s.sendall(f"POST /clip/encode_text HTTP/1.1\r\nHost: {host}\r\n{lines}\r\n".encode())
            for part in parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer is what counts
        reader.join(wait)
    return int(bytes(answer).split(b" ", 2)[1]), bytes(answer)


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    t0 = time.monotonic()
    status, answer = _raw_post(
        server.url, {"Content-Length": str(100 * BODY_LIMIT)}, [b'{"text": "' + b"x" * 1000]
    )
    assert status == 413 and b"limit of 4194304 bytes" in answer
    assert time.monotonic() - t0 < 5


def test_a_chunked_body_is_cut_at_the_limit(server):
    """No Content-Length: the limit is counted while the body streams in."""
    piece = b"x" * 65536
    parts = [b'{"text": "'] + [piece] * (BODY_LIMIT // len(piece) + 1)
    parts = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts]
    status, answer = _raw_post(server.url, {"Transfer-Encoding": "chunked"}, parts)
    assert status == 413 and b"limit of 4194304 bytes" in answer
    assert send(server.url, "clip/encode_text", {"text": "x"}).status_code == 200


def test_a_dense_answer_over_the_limit_is_refused_with_its_size(server):
    r = send(server.url, "dino/extract", {"image": GOOD_B64, "load_size": 1000, "bin": True})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "MiB" in msg and "limit" in msg


# --------------------------------------------------------------------------- soak


def _tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.mark.soak
def test_mixed_routes_soak_at_concurrency_32(server):
    """Every route in turn, 32 clients, SOAK_SECONDS: no errors, server RSS flat after warm-up.
    Opt-in (``pytest -m soak``); the latencies it prints are a measurement, not a pass mark."""
    bodies = [(route, json.dumps(body)) for route, body in ROUTES.items()]
    latencies: dict[str, list[float]] = {route: [] for route in ROUTES}
    failures: list[str] = []
    stop_at = 0.0

    def client(i: int) -> None:
        session = requests.Session()
        n = i
        while time.monotonic() < stop_at:
            route, body = bodies[n % len(bodies)]
            n += 1
            t0 = time.perf_counter()
            try:
                r = session.post(
                    f"{server.url}/{route}",
                    data=body,
                    headers={**auth(), "Content-Type": "application/json"},
                    timeout=60,
                )
                if r.status_code != 200:
                    failures.append(f"{route}: {r.status_code} {r.text[:200]}")
            except requests.RequestException as e:
                failures.append(f"{route}: {e}")
            latencies[route].append(time.perf_counter() - t0)

    def run(seconds: float) -> None:
        nonlocal stop_at
        stop_at = time.monotonic() + seconds
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(client, range(32)))

    run(min(30.0, SOAK_SECONDS / 4))  # warm-up: caches, allocator pools, lazy imports
    for lat in latencies.values():
        lat.clear()
    rss_before = _tree_rss(server.proc.pid)
    run(SOAK_SECONDS)
    rss_after = _tree_rss(server.proc.pid)
    rows = [
        f"| /{route} | {len(lat)} | "
        + " | ".join(f"{np.percentile(lat, q) * 1000:.0f}" for q in (50, 95, 99))
        + " |"
        for route, lat in latencies.items()
    ]
    total = sum(len(lat) for lat in latencies.values())
    print(
        f"\nsoak: {SOAK_SECONDS:.0f} s at concurrency 32, {total} requests, {len(failures)} errors, "
        f"server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB "
        f"({(rss_after / rss_before - 1) * 100:+.1f}%)\n| route | requests | p50 ms | p95 ms | p99 ms |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )
    assert not failures, failures[:5]
    assert all(len(lat) > 0 for lat in latencies.values())
    assert rss_after < rss_before * 1.05
