"""Image files, checked and named: :func:`probe_image` reads only the header (format and size)
so bad or oversized images are refused before any decoding; :func:`decode_image` decodes the
pixels; :func:`content_id` names the file.

The HTTP process probes (apis/http/inputs.py reads the bytes); the model worker decodes.

Embed once, prompt many: ``image_id`` names an image a SAM worker has encoded and cached. It is
the lowercase hex SHA-256 of the image FILE's bytes as the server received them (after base64
decoding, reading the path or fetching the URL), so a client computes it locally without asking.
The HTTP process computes it for every request that carries an image to a caching route; it is
the key of the worker's cache (apis/core/cache.py) and of the dispatcher's affinity
(apis/transport/dispatch.py), and clients send it as the ``X-Image-Key`` header, the key a load
balancer hashes on to keep an image's requests on one replica.
"""

from __future__ import annotations

import hashlib
import re
import struct
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from apis.core.errors import APIError
from apis.core.settings import Limits

# We enforce our own pixel limit (with a clear message) before any decoding happens.
Image.MAX_IMAGE_PIXELS = None

_EXIF_ORIENTATION = 0x0112
_PNG_CHUNK_HEAD = struct.Struct(">I4s")  # data length, chunk type

#: The Pillow formats a request may send. Each reads its header without decoding pixels, so the
#: pixel limit applies first; every other plugin (ICO decodes on open, DDS, SPIDER, ...) is
#: refused unread.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ALLOWED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
#: Pillow parses JPEG markers, PNG chunks and GIF blocks one by one in Python before the pixels;
#: a file that needs more steps than this is refused (docs/benchmarks.md, Measured choices).
HEADER_STEPS = 10_000


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
        # No EXIF chunk anywhere: Pillow's PNG getexif() would decode every pixel to look for one.
        return w, h
    if getattr(img, "_tile_size", (w, h)) != (w, h):
        # Pillow's TIFF plugin reports the size with the orientation already applied
        return w, h
    try:
        rotated = img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 (a damaged file: decoding will say what is wrong with it)
        rotated = False
    return (h, w) if rotated else (w, h)


def _png_has_chunk(data: bytes, kind: bytes) -> bool:
    """Whether a chunk of type ``kind`` is in the PNG, from the chunk headers alone (a few dozen
    reads, not a search of the whole file). A file whose chunks run past its end answers True,
    so the caller takes the careful path."""
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


IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # what content_id gives: requests' image_id must match it


def content_id(data: bytes) -> str:
    """The image_id of an image file: hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def not_cached(image_id: str, family: str) -> APIError:
    return APIError(
        404,
        f"image_id {image_id} is not cached on this server (never embedded here, or evicted): send the "
        f"image itself again (image, image_url or image_path), or POST it to /{family}/embed first",
        param="image_id",
        code="image_not_cached",
    )
