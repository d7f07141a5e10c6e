"""Image inputs: ``image`` (base64 / data URI), ``image_url`` and ``image_path``.

The HTTP process turns whichever field a request used into the file's raw bytes (blocking I/O,
run off the event loop), then checks the header with :func:`apis.core.images.probe_image`.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import stat
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pybase64
from pydantic import BaseModel, Field, field_validator, model_validator

from apis.config import ServerConfig
from apis.core.errors import APIError
from apis.core.images import IMAGE_ID
from apis.core.settings import PathInput, UrlInput

IMAGE_FIELDS = ("image", "image_url", "image_path")


class ImageInput(BaseModel):
    """Exactly one of the three image fields."""

    image: str | None = Field(None, description="Base64 image bytes, optionally as a data: URI.")
    image_url: str | None = Field(None, description="http(s) URL; only when the server enables URL input.")
    image_path: str | None = Field(
        None, description="File on the server; only inside the server's configured image roots."
    )

    @model_validator(mode="after")
    def _exactly_one_image(self):
        given = [f for f in IMAGE_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "send exactly one of 'image' (base64), 'image_url' or 'image_path'"
                + (f"; got {', '.join(given)}" if given else "; got none")
            )
        return self


def read_image_bytes(req: ImageInput, cfg: ServerConfig) -> bytes:
    """The raw file bytes behind whichever image field the request used (blocking I/O)."""
    limit = cfg.limits.max_body_bytes
    if req.image is not None:
        return decode_base64(req.image)
    if req.image_url is not None:
        return fetch_url(req.image_url, cfg.inputs.url, limit)
    return read_path(req.image_path, cfg.inputs.path, limit)


def decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, "image data URI must look like 'data:image/png;base64,<data>'", param="image")
        if not head.lower().startswith("data:image/"):
            mime = head[5:].partition(";")[0] or "none"
            raise APIError(
                400,
                f"image data URI has MIME type {mime!r}; send an image type ('data:image/png;base64,<data>')",
                param="image",
                code="invalid_image",
            )
    try:
        data = pybase64.b64decode(text, validate=True)  # SIMD: ~40x the standard library's speed
    except (binascii.Error, ValueError):
        data = _decode_base64_slowly(text)
    if not data:
        raise APIError(400, "'image' is empty", param="image", code="invalid_image")
    return data


def _decode_base64_slowly(text: str) -> bytes:
    """Line-wrapped base64 (what the ``base64`` tool writes), or the exact reason it is invalid:
    pybase64 says "Non-base64 digit found" for every fault, including padding."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(
            400,
            f"'image' is not valid base64 ({e}); send the file's bytes base64-encoded",
            param="image",
            code="invalid_base64",
        ) from None


# --------------------------------------------------------------------------- image_path


def read_path(path: str, cfg: PathInput, max_bytes: int, param: str = "image_path") -> bytes:
    """A file under one of the roots; ``param``: the request field that named it."""
    if not cfg.roots:
        raise APIError(
            400,
            f"{param} input is disabled on this server; send the file as base64 instead "
            "(operators enable paths with inputs.path.roots)",
            param=param,
            code="input_disabled",
        )
    if "\x00" in path or not path.strip():
        raise APIError(400, f"{param} is empty or contains a NUL byte", param=param)
    roots = [os.path.realpath(r) for r in cfg.roots]
    candidate = Path(path) if os.path.isabs(path) else Path(roots[0]) / path
    real = os.path.realpath(candidate)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise APIError(
            400,
            f"{param} must point inside one of the server's image roots",
            param=param,
            code="path_not_allowed",
        )
    try:
        st = os.stat(real)
    except OSError:
        raise APIError(400, f"{param} {path!r} does not exist", param=param, code="image_not_found") from None
    if not stat.S_ISREG(st.st_mode):
        raise APIError(400, f"{param} {path!r} is not a regular file", param=param)
    if st.st_size > max_bytes:
        raise APIError(413, f"{param} file is {st.st_size} bytes; the limit is {max_bytes}", param=param)
    with open(real, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- image_url


def _host_rules(cfg: UrlInput) -> tuple[list[ipaddress._BaseNetwork], list[str]]:
    nets, names = [], []
    for entry in cfg.allowed_hosts:
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.append(entry.lower().rstrip("."))
    return nets, names


def _name_allowed(host: str, names: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == n or (n.startswith("*.") and host.endswith(n[1:])) for n in names)


def _pick_address(host: str, port: int, cfg: UrlInput) -> str:
    """Resolve ``host`` and return an address it is safe to connect to, or refuse."""
    nets, names = _host_rules(cfg)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise APIError(400, f"image_url host {host!r} does not resolve", param="image_url") from None
    addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    listed_ip = [a for a in addrs if any(a in n for n in nets)]
    if cfg.allowed_hosts and not listed_ip and not _name_allowed(host, names):
        raise APIError(
            400,
            f"image_url host {host!r} is not on this server's allow-list",
            param="image_url",
            code="url_not_allowed",
        )
    for a in addrs:
        # Every address the name has must be acceptable, so a second lookup cannot pick a worse one.
        if not (a.is_global or cfg.allow_private_networks or a in listed_ip):
            raise APIError(
                400,
                f"image_url host {host!r} resolves to a non-public address; refused",
                param="image_url",
                code="url_not_allowed",
            )
    return str(addrs[0])


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked in advance, so DNS cannot change between check and use."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, cfg: UrlInput, max_bytes: int) -> bytes:
    if not cfg.enabled:
        raise APIError(
            400,
            "image_url input is disabled on this server; send the image as base64 in 'image' "
            "(operators enable URLs with inputs.url.enabled)",
            param="image_url",
            code="input_disabled",
        )
    for _ in range(cfg.max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise APIError(400, "image_url must be an http:// or https:// URL with a host", param="image_url")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _pick_address(parts.hostname, port, cfg)
        conn_cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = conn_cls(parts.hostname, port, address, cfg.timeout_s)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "visionserve", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise APIError(400, f"image_url answered HTTP {resp.status}", param="image_url")
            data = resp.read(max_bytes + 1)
        except (OSError, http.client.HTTPException) as e:
            raise APIError(400, f"could not fetch image_url: {e}", param="image_url") from None
        finally:
            conn.close()
        if len(data) > max_bytes:
            raise APIError(413, f"image_url body is over the {max_bytes}-byte limit", param="image_url")
        return data
    raise APIError(400, f"image_url redirected more than {cfg.max_redirects} times", param="image_url")


# --------------------------------------------------------------------------- pixels


class CachedImageInput(ImageInput):
    """An image, or the ``image_id`` of one that a ``/embed`` call (or an earlier request) cached."""

    image_id: str | None = Field(
        None,
        description="Instead of the image: the id /embed answered, i.e. the hex SHA-256 of the image "
        "file's bytes. Unknown or evicted ids get 404 image_not_cached: then send the image again.",
    )

    @field_validator("image_id")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not IMAGE_ID.fullmatch(value.lower()):
            raise ValueError(
                f"image_id must be 64 hex digits (the SHA-256 of the image file, as /embed answers it); "
                f"got {len(value)} characters{'' if len(value) > 80 else f': {value!r}'}"
            )
        return value.lower()

    @model_validator(mode="after")
    def _exactly_one_image(self):
        given = [f for f in (*IMAGE_FIELDS, "image_id") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                "send exactly one of 'image' (base64), 'image_url', 'image_path' or 'image_id'"
                + (f"; got {', '.join(given)}" if given else "; got none")
            )
        return self


class EmbedResponse(BaseModel):
    image_id: str = Field(..., description="Hex SHA-256 of the image file: send it as image_id from now on.")
    width: int
    height: int
    cached: bool = Field(..., description="true: the worker had it already and the encoder did not run.")
    model: str


def embed_answer(image_id: str, size: tuple[int, int], cached: bool, model_id: str) -> dict:
    """The answer of ``/sam2/embed`` and ``/sam3/embed`` (:class:`EmbedResponse`); ``size`` is
    (width, height)."""
    return {"image_id": image_id, "width": size[0], "height": size[1], "cached": cached, "model": model_id}
