"""Image inputs: ``image`` (base64 / data URI), ``image_url`` and ``image_path``, each checked.

The HTTP process turns whichever field a request used into the file's raw bytes and reads only
the header (format and size), so bad or oversized images are refused before they reach a
model worker. The worker then decodes the pixels with :func:`decode_image`.
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
import struct
from io import BytesIO
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field, model_validator

from .config import Limits, PathInput, ServerConfig, UrlInput
from .errors import APIError

# We enforce our own pixel limit (with a clear message) before any decoding happens.
Image.MAX_IMAGE_PIXELS = None

IMAGE_FIELDS = ("image", "image_url", "image_path")
_EXIF_ORIENTATION = 0x0112
_PNG_CHUNK_HEAD = struct.Struct(">I4s")  # data length, chunk type

#: The Pillow formats a request may send. Each reads its header without decoding pixels, so the
#: pixel limit applies first; every other plugin (ICO decodes on open, DDS, SPIDER, ...) is
#: refused unread.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ALLOWED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
#: Pillow parses JPEG markers, PNG chunks and GIF blocks before the pixels one by one in Python
#: (3 million empty JPEG markers took 3 s); a file that needs more steps than this is refused.
HEADER_STEPS = 10_000


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


def read_path(path: str, cfg: PathInput, max_bytes: int) -> bytes:
    if not cfg.roots:
        raise APIError(
            400,
            "image_path input is disabled on this server; send the image as base64 in 'image' "
            "(operators enable paths with inputs.path.roots)",
            param="image_path",
            code="input_disabled",
        )
    if "\x00" in path or not path.strip():
        raise APIError(400, "image_path is empty or contains a NUL byte", param="image_path")
    roots = [os.path.realpath(r) for r in cfg.roots]
    candidate = Path(path) if os.path.isabs(path) else Path(roots[0]) / path
    real = os.path.realpath(candidate)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise APIError(
            400,
            "image_path must point inside one of the server's image roots",
            param="image_path",
            code="path_not_allowed",
        )
    try:
        st = os.stat(real)
    except OSError:
        raise APIError(
            400, f"image_path {path!r} does not exist", param="image_path", code="image_not_found"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise APIError(400, f"image_path {path!r} is not a regular file", param="image_path")
    if st.st_size > max_bytes:
        raise APIError(
            413, f"image_path file is {st.st_size} bytes; the limit is {max_bytes}", param="image_path"
        )
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


def _unreadable(e: Exception) -> APIError:
    return APIError(400, f"the image could not be read: {e}", param="image", code="invalid_image")


def _open(data: bytes, limits: Limits) -> Image.Image:
    """The image with only its header read; refuses other formats, costly headers and images over
    the limits. Any exception of a Pillow plugin is the file's fault: a 400."""
    _check_header_steps(data)
    try:
        img = Image.open(BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise APIError(
            400,
            f"the image bytes are not a format this server reads; send {ALLOWED_NAMES}",
            param="image",
            code="invalid_image",
        ) from None
    except Exception as e:  # noqa: BLE001 (plugins raise anything on crafted files)
        raise _unreadable(e) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise APIError(400, f"image has no pixels ({w}x{h})", param="image", code="invalid_image")
    if w * h > limits.max_image_pixels or max(w, h) > limits.max_image_side:
        raise APIError(
            413,
            f"image is {w}x{h} ({w * h / 1e6:.1f} MP); this server accepts at most "
            f"{limits.max_image_pixels / 1e6:.1f} MP and {limits.max_image_side} px per side: downscale it",
            param="image",
            code="image_too_large",
        )
    return img


def _check_header_steps(data: bytes) -> None:
    """400 for a JPEG, PNG or GIF whose header Pillow would parse in more than HEADER_STEPS steps."""
    if data[:2] == b"\xff\xd8":
        steps, kind = _jpeg_steps(data), "JPEG markers or filler bytes before its image data"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        steps, kind = _png_steps(data), "PNG chunks before its image data"
    elif data[:4] == b"GIF8":
        steps, kind = _gif_steps(data), "GIF blocks before its first frame"
    else:
        return
    if steps > HEADER_STEPS:
        raise APIError(
            400,
            f"the image has more than {HEADER_STEPS} {kind}; re-encode it",
            param="image",
            code="invalid_image",
        )


def _jpeg_steps(data: bytes) -> int:
    """Steps of Pillow's JPEG header loop up to the first scan (stops counting past the budget):
    one per marker segment, one per filler or junk byte, as Pillow reads them."""
    at, steps, n = 2, 0, len(data)
    while at + 1 < n and steps <= HEADER_STEPS:
        if data[at] != 0xFF:  # junk: Pillow skips it a byte at a time
            nxt = data.find(b"\xff", at)
            nxt = n if nxt < 0 else nxt
            steps, at = steps + nxt - at, nxt
            continue
        steps += 1
        marker = data[at + 1]
        if marker in (0xFF, 0x00):  # filler, escaped 0xFF
            at += 1
        elif marker == 0xDA:  # start of scan: the header ends
            break
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            at += 2
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return steps


def _png_steps(data: bytes) -> int:
    """Chunks before the first IDAT (Pillow reads them one by one on open)."""
    at, steps = 8, 0
    while at + 8 <= len(data) and steps <= HEADER_STEPS:
        length, kind = _PNG_CHUNK_HEAD.unpack_from(data, at)
        if kind == b"IDAT":
            break
        steps += 1
        at += 12 + length
    return steps


def _gif_steps(data: bytes) -> int:
    """Extension sub-blocks before the first image descriptor (Pillow reads each in Python)."""
    if len(data) < 13:
        return 0
    at = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # after the global palette
    steps = 0
    while at < len(data) and steps <= HEADER_STEPS and data[at] == 0x21:  # an extension
        at += 2
        while at < len(data) and steps <= HEADER_STEPS:
            steps += 1
            size = data[at]
            at += 1 + size
            if size == 0:
                break
    return steps


def probe_image(data: bytes, limits: Limits) -> tuple[int, int]:
    """(width, height) as decoded (EXIF rotation included), from the header alone; refuses
    non-images and oversized images."""
    img = _open(data, limits)
    w, h = img.size
    if img.format == "PNG" and "exif" not in img.info and not _png_has_chunk(data, b"eXIf"):
        # No EXIF chunk anywhere. Pillow's PNG getexif() would decode every pixel to look for
        # one after the image data (5 ms of a 640x480 prompt in the HTTP process, repeated by
        # the worker).
        return w, h
    try:
        rotated = img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 (a damaged file: decoding will say what is wrong with it)
        rotated = False
    return (h, w) if rotated else (w, h)


def _png_has_chunk(data: bytes, kind: bytes) -> bool:
    """Whether a chunk of type ``kind`` is in the PNG, from the chunk headers alone: a few dozen
    8-byte reads where searching the bytes (``kind in data``) took 0.37 ms for a 640x480 photo.
    A file whose chunks run past its end answers True, so the caller takes the careful path."""
    at = 8  # after the signature
    while at + 8 <= len(data):
        length, found = _PNG_CHUNK_HEAD.unpack_from(data, at)
        if found == kind:
            return True
        if found == b"IEND":
            return False
        at += 12 + length  # head, data, CRC
    return True


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Fully decoded RGB image, EXIF orientation applied, first frame of animations."""
    img = _open(data, limits)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I;16") or img.mode == "I":
            # 16/32-bit grey: keep the top 8 of 16 bits instead of letting convert() clip to white.
            arr = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
            img = Image.fromarray(arr.astype(np.uint8), "L")
        elif img.mode == "F":
            img = Image.fromarray(np.clip(np.nan_to_num(np.asarray(img)), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 (any plugin or mode failure is the file's fault)
        raise APIError(
            400, f"the image data is truncated or corrupt: {e}", param="image", code="invalid_image"
        ) from None
