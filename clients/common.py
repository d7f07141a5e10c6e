"""What every client shares: server settings, HTTP with clear errors, image and tensor coding."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pybase64
import requests
import yaml

SERVERS_ENV = "VISIONSERVE_SERVERS"
NPY_MEDIA_TYPE = "application/x-npy"
IMAGE_KEY_HEADER = "X-Image-Key"  # the image_id, for load balancers that keep an image on one replica
KEY_ENV = "VISIONSERVE_API_KEY"
_DEFAULT_SERVERS = Path(__file__).with_name("servers.yaml")
_local = threading.local()


class VisionServeError(RuntimeError):
    """The server refused or failed a request; ``message`` is the server's own explanation."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, body: Any = None
    ):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.body = body


def server_settings(
    family: str, base_url: str | None = None, api_key: str | None = None
) -> tuple[str, str | None]:
    """(base_url, api_key): explicit arguments first, then servers.yaml, then $VISIONSERVE_API_KEY."""
    if base_url is None or api_key is None:
        path = Path(os.environ.get(SERVERS_ENV, _DEFAULT_SERVERS))
        entry = (yaml.safe_load(path.read_text()) or {}).get(family, {}) if path.exists() else {}
        base_url = base_url or entry.get("base_url") or f"http://127.0.0.1:8000/{family}"
        api_key = api_key or entry.get("api_key") or os.environ.get(KEY_ENV)
    return base_url.rstrip("/"), api_key


def _session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


def _raise_for(resp: requests.Response) -> None:
    if resp.ok:
        return
    try:
        body = resp.json()
    except ValueError:
        body = resp.text
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        raise VisionServeError(
            resp.status_code, err.get("message", ""), err.get("code"), err.get("param"), body
        )
    detail = body.get("detail") if isinstance(body, dict) else body
    raise VisionServeError(resp.status_code, str(detail or resp.reason), body=body)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def post(
    family: str,
    route: str,
    payload: dict,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    headers: dict[str, str] | None = None,
) -> dict:
    """POST JSON, return the answer: parsed JSON, or for a ``.npy`` body (dense routes with
    ``response_format="npy"``) ``{"array": ndarray, "model": ..., "is_pca": ...}``."""
    url, key = server_settings(family, base_url, api_key)
    resp = _session().post(
        f"{url}/{route}", json=payload, headers={**_headers(key), **(headers or {})}, timeout=timeout
    )
    _raise_for(resp)
    if resp.headers.get("content-type", "").startswith(NPY_MEDIA_TYPE):
        return {"array": np.load(io.BytesIO(resp.content), allow_pickle=False), **_npy_meta(resp.headers)}
    return resp.json()


def send(
    method: str, url: str, api_key: str | None, timeout: float = 600.0, **kwargs: Any
) -> requests.Response:
    """One request on this thread's connection pool with the bearer key; a refusal raises
    :class:`VisionServeError`. ``stream=True`` leaves the body to be read as it arrives."""
    resp = _session().request(method, url, headers=_headers(api_key), timeout=timeout, **kwargs)
    try:
        _raise_for(resp)
    except VisionServeError:
        resp.close()
        raise
    return resp


def _npy_meta(headers) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, value in headers.items():
        if name.lower().startswith("x-visionserve-"):
            key = name[len("x-visionserve-") :].lower().replace("-", "_")
            meta[key] = {"True": True, "False": False}.get(value, value)
    return meta


def get(
    family: str, route: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 10.0
) -> dict:
    url, key = server_settings(family, base_url, api_key)
    resp = _session().get(f"{url}/{route}", headers=_headers(key), timeout=timeout)
    _raise_for(resp)
    return resp.json()


def image_file_bytes(image: Any) -> bytes:
    """The file bytes a request carries for an image: a file path, raw bytes, a PIL image or an
    HxWx3 uint8 array (PIL images and arrays as PNG)."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_image(image: Any) -> str:
    """Base64 of an image: a file path, raw bytes, a PIL image or an HxWx3 uint8 array."""
    return pybase64.b64encode_as_string(image_file_bytes(image))


def content_id(data: bytes) -> str:
    """The server's image_id of an image file: the hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def base64_image_id(text: str) -> str:
    """The image_id of base64 image text (a data: URI too), as the server computes it."""
    return content_id(pybase64.b64decode(text.partition(",")[2] if text.startswith("data:") else text))


def post_image(
    family: str,
    route: str,
    payload: dict,
    fields: dict[str, str],
    image_id: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """POST ``payload`` with an image: its ``image_id`` alone when given, the image ``fields``
    (:func:`image_fields`) otherwise. When the server no longer has that id (404
    ``image_not_cached``) and ``fields`` hold the image, it is sent again (which caches it anew).
    The id also travels as the ``X-Image-Key`` header, computed here from base64 ``image``."""
    key = image_id or (base64_image_id(fields["image"]) if "image" in fields else None)
    headers = {IMAGE_KEY_HEADER: key} if key else None
    if image_id is not None:
        try:
            return post(family, route, {**payload, "image_id": image_id}, base_url, api_key, timeout, headers)
        except VisionServeError as e:
            if e.code != "image_not_cached" or not fields:
                raise
    return post(family, route, {**payload, **fields}, base_url, api_key, timeout, headers)


# The arguments of a client function that say where and how to send, not what to ask.
_IMAGE_ARGS = ("image", "image_url", "image_path")
_CONNECTION_ARGS = ("base_url", "api_key", "timeout")


def post_arguments(
    family: str, route: str, arguments: dict[str, Any], drop_none: bool = False, image_key: bool = False
) -> dict:
    """POST a route from a client function whose parameters are named as the route's request
    fields: ``arguments`` is that function's ``locals()``. The image arguments become the image
    fields, the connection ones set up the call, every other one is a JSON field (left out when
    None if ``drop_none``). ``image_key`` (families that cache images) sends through
    :func:`post_image`: ``image_id`` with its fallback and the ``X-Image-Key`` header."""
    args = dict(arguments)
    fields = image_fields(*(args.pop(name, None) for name in _IMAGE_ARGS))
    base_url, api_key, timeout = (args.pop(name) for name in _CONNECTION_ARGS)
    image_id = args.pop("image_id", None)
    payload = {k: v for k, v in args.items() if v is not None or not drop_none}
    if image_key:
        return post_image(family, route, payload, fields, image_id, base_url, api_key, timeout)
    return post(family, route, {**payload, **fields}, base_url, api_key, timeout)


def image_fields(image: Any = None, image_url: str | None = None, image_path: str | None = None) -> dict:
    """The request's image fields. A ``str`` ``image`` is already base64 (as in the seed clients)."""
    if image is not None and not isinstance(image, str):
        image = encode_image(image)
    fields = {"image": image, "image_url": image_url, "image_path": image_path}
    return {k: v for k, v in fields.items() if v is not None}


def image_arg(image: Any) -> Any:
    """The ``*_decoded`` helpers take a file path (as in the seed) or an image object."""
    return encode_image(image) if isinstance(image, str) else image


def decode_array(data: str, shape: list[int], dtype: str = "float32") -> np.ndarray:
    """Inverse of the server's tensor encoding: base64 little-endian values -> array of ``shape``."""
    raw = pybase64.b64decode_as_bytearray(data)  # writable, so numpy and torch can use it in place
    return (
        np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype, copy=False)
    )
