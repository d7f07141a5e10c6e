"""The image decoder against hostile files, without a server: the format allow-list, pixel limits
read from every allowed format's header before any decoding, header-parsing budgets, data URIs,
and a seeded mutation fuzz over valid files of every allowed format."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from apis.core.errors import APIError
from apis.core.images import ALLOWED_FORMATS, HEADER_STEPS, decode_image, probe_image
from apis.core.settings import Limits
from apis.http.inputs import decode_base64

LIMITS = Limits(max_image_pixels=4_000_000, max_image_side=4096)
FUZZ_SEED = 24
FUZZ_PER_FORMAT = 80  # x 6 formats = 480 mutated files, ~1 s


def encoded(fmt: str, size: tuple[int, int] = (37, 23), **save) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


VALID = {
    "JPEG": encoded("JPEG"),
    "PNG": encoded("PNG"),
    "WEBP": encoded("WEBP", lossless=True),
    "GIF": encoded("GIF"),
    "BMP": encoded("BMP"),
    "TIFF": encoded("TIFF"),
}


def test_every_allowed_format_decodes_at_its_size():
    assert set(VALID) == set(ALLOWED_FORMATS)
    for fmt, data in VALID.items():
        assert probe_image(data, LIMITS) == (37, 23), fmt
        assert decode_image(data, LIMITS).size == (37, 23), fmt


def _outcome(data: bytes) -> str:
    """'ok' or the 4xx status; anything else (another exception, a 5xx) fails the test."""
    try:
        probe_image(data, LIMITS)
        decode_image(data, LIMITS)
    except APIError as e:
        assert 400 <= e.status < 500, (e.status, e.message)
        return str(e.status)
    return "ok"


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    buf = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:  # flip a few bits
        for at in rng.integers(0, len(buf), rng.integers(1, 8)):
            buf[at] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # overwrite a run with random bytes
        at = int(rng.integers(len(buf)))
        run = rng.integers(0, 256, int(rng.integers(1, 32)), dtype=np.uint8).tobytes()
        buf[at : at + len(run)] = run
    elif kind == 2:  # truncate
        del buf[int(rng.integers(1, len(buf))) :]
    elif kind == 3:  # insert random bytes
        at = int(rng.integers(len(buf)))
        buf[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:  # header fields to extremes: 0x00 / 0xFF bytes in the first 64
        for at in rng.integers(0, min(64, len(buf)), rng.integers(1, 4)):
            buf[at] = 0xFF if rng.integers(2) else 0x00
    return bytes(buf)


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_fuzzed_files_give_success_or_a_4xx(fmt):
    """Mutated valid files (fixed seed): every one is decoded or refused with a 4xx APIError,
    never another exception."""
    rng = np.random.default_rng([FUZZ_SEED, ALLOWED_FORMATS.index(fmt)])
    outcomes = [_outcome(_mutate(VALID[fmt], rng)) for _ in range(FUZZ_PER_FORMAT)]
    assert "400" in outcomes  # the mutations do break files


def _ico_of_big_png() -> bytes:
    """An ICO wrapping a 30000x30000 1-bit PNG header (Pillow's ICO reader decodes on open)."""
    png = _png_header(30000, 30000, depth=1, colour=0)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 1, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def _png_header(w: int, h: int, depth: int = 8, colour: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _dds() -> bytes:
    """A DDS header with pixel-format flags Pillow does not implement (NotImplementedError)."""
    header = bytearray(128)
    header[:4] = b"DDS "
    struct.pack_into("<IIII", header, 4, 124, 0x1007, 4, 4)  # size, flags, height, width
    struct.pack_into("<II", header, 76, 32, 0x80000)  # pixel format size, odd flags
    return bytes(header) + b"\0" * 64


@pytest.mark.parametrize(
    "data",
    [
        _ico_of_big_png(),
        _dds(),
        b"BM" + b"\0" * 10,
        b"\x00\x00\x01\x00" + b"\0" * 40,
        b"%PDF-1.4\n" + b"\0" * 50,
    ],
    ids=["ico", "dds", "broken bmp", "icon header", "pdf"],
)
def test_formats_off_the_allow_list_are_refused_naming_the_allowed_ones(data):
    with pytest.raises(APIError) as e:
        probe_image(data, LIMITS)
    assert e.value.status == 400
    assert "JPEG, PNG, WebP, GIF, BMP or TIFF" in e.value.message or "could not be read" in e.value.message


def test_an_ico_is_refused_without_being_decoded(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)
    with pytest.raises(APIError, match="JPEG, PNG, WebP, GIF, BMP or TIFF"):
        probe_image(_ico_of_big_png(), LIMITS)


def _no_decoding(self):
    raise AssertionError("pixels were decoded")


def _set_dims(fmt: str, data: bytes, w: int, h: int) -> bytes:
    """``data`` with the header's width and height replaced (pixel data left as it was)."""
    buf = bytearray(data)
    if fmt == "PNG":
        return _png_header(w, h)
    if fmt == "BMP":
        struct.pack_into("<ii", buf, 18, w, h)
    elif fmt == "GIF":
        struct.pack_into("<HH", buf, 6, w, h)  # logical screen
        at = buf.index(b"\x2c", 13 + 3 * 256)  # image descriptor after the 256-colour palette
        struct.pack_into("<HH", buf, at + 5, w, h)
    elif fmt == "JPEG":
        at = buf.index(b"\xff\xc0")
        struct.pack_into(">HH", buf, at + 5, h, w)
    elif fmt == "TIFF":
        (ifd,) = struct.unpack_from("<I", buf, 4)
        (count,) = struct.unpack_from("<H", buf, ifd)
        for i in range(count):
            at = ifd + 2 + 12 * i
            tag, kind = struct.unpack_from("<HH", buf, at)
            if tag in (256, 257):
                struct.pack_into("<H" if kind == 3 else "<I", buf, at + 8, w if tag == 256 else h)
    elif fmt == "WEBP":  # VP8L: 14 bits width-1, 14 bits height-1 after the 0x2f signature
        at = buf.index(b"VP8L") + 8
        assert buf[at] == 0x2F
        bits = struct.unpack_from("<I", buf, at + 1)[0]
        bits = (bits & ~((1 << 28) - 1)) | (w - 1) | ((h - 1) << 14)
        struct.pack_into("<I", buf, at + 1, bits)
    return bytes(buf)


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_pixel_limits_apply_to_every_format_before_any_decoding(fmt, monkeypatch):
    w, h = (16000, 16000) if fmt != "GIF" else (65000, 65000)
    big = _set_dims(fmt, VALID[fmt], w, h)
    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)
    for step in (probe_image, decode_image):
        with pytest.raises(APIError) as e:
            step(big, LIMITS)
        assert e.value.status == 413 and f"{w}x{h}" in e.value.message, (fmt, e.value.message)


def test_a_jpeg_with_a_million_empty_markers_is_refused_by_its_step_count():
    jpeg = VALID["JPEG"]
    bad = jpeg[:2] + b"\xff\xe5\x00\x02" * 1_000_000 + jpeg[2:]
    with pytest.raises(APIError, match=f"more than {HEADER_STEPS} JPEG markers"):
        probe_image(bad, LIMITS)
    junk = jpeg[:2] + b"\x00" * (HEADER_STEPS + 1) + jpeg[2:]
    with pytest.raises(APIError, match="JPEG markers or filler"):
        probe_image(junk, LIMITS)
    # a few hundred markers, as in real files with EXIF, XMP and ICC segments, are fine
    ok = jpeg[:2] + b"\xff\xe5\x00\x02" * 300 + jpeg[2:]
    assert probe_image(ok, LIMITS) == (37, 23)


def test_png_and_gif_with_too_many_header_blocks_are_refused():
    png = VALID["PNG"]
    at = png.index(b"IDAT") - 4
    chunk = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))
    with pytest.raises(APIError, match="PNG chunks"):
        probe_image(png[:at] + chunk * (HEADER_STEPS + 1) + png[at:], LIMITS)
    gif = VALID["GIF"]
    at = 13 + 3 * 256
    comment = b"\x21\xfe\x01x\x00"
    with pytest.raises(APIError, match="GIF blocks"):
        probe_image(gif[:at] + comment * (HEADER_STEPS + 1) + gif[at:], LIMITS)
    assert probe_image(gif[:at] + comment * 10 + gif[at:], LIMITS) == (37, 23)


@pytest.mark.parametrize("mime", ["text/plain", "application/octet-stream", "", "TEXT/html"])
def test_data_uris_with_a_non_image_type_are_refused(mime):
    data = base64.b64encode(VALID["PNG"]).decode()
    with pytest.raises(APIError, match="image type"):
        decode_base64(f"data:{mime};base64,{data}")
    assert decode_base64(f"data:image/png;base64,{data}") == VALID["PNG"]
    assert decode_base64(f"data:IMAGE/PNG;base64,{data}") == VALID["PNG"]


# ----------------------------------------------------------------------------- pixels

RAW = np.random.default_rng(5).integers(0, 256, (23, 37, 3), dtype=np.uint8)
#: EXIF orientation -> the displayed image from the stored pixels, written from the tag's
#: definition (where the stored 0th row and 0th column land), not from Pillow
ORIENTED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # 0th row on the left, 0th column at the top
    6: lambda a: np.rot90(a, -1),  # 0th row on the right, 0th column at the top: 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # 0th row on the right, 0th column at the bottom
    8: lambda a: np.rot90(a, 1),  # 0th row on the left, 0th column at the bottom
}


def with_orientation(fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(RAW).save(buf, format=fmt, exif=exif.tobytes(), **extra)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_stored_pixels_as_the_tag_defines(fmt, orientation):
    data = with_orientation(fmt, orientation)
    # JPEG is lossy: its stored pixels as Pillow decodes them without looking at the tag
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) if fmt == "JPEG" else RAW
    want = ORIENTED[orientation](stored)
    assert probe_image(data, LIMITS) == (want.shape[1], want.shape[0])
    np.testing.assert_array_equal(np.asarray(decode_image(data, LIMITS)), want)


def frames(n: int = 3) -> list[np.ndarray]:
    """Distinct frames of four palette colours each (exact in GIF's palette and lossless WebP)."""
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    rng = np.random.default_rng(7)
    return [colours[rng.integers(0, 4, (23, 37))] for _ in range(n)]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_decode_to_their_first_frame(fmt):
    pics = [Image.fromarray(f) for f in frames()]
    if fmt == "GIF":
        pics = [p.quantize(colors=4) for p in pics]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    pics[0].save(buf, format=fmt, save_all=True, append_images=pics[1:], duration=100, loop=0, **extra)
    data = buf.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3, "the file must be animated"
    np.testing.assert_array_equal(np.asarray(decode_image(data, LIMITS)), frames()[0])


def test_16_bit_grey_keeps_the_top_8_bits():
    grey = np.random.default_rng(3).integers(0, 65536, (23, 37)).astype(np.uint16)
    grey[0, :4] = [255, 256, 65279, 65535]  # the edges of a bucket
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    got = np.asarray(decode_image(buf.getvalue(), LIMITS))
    np.testing.assert_array_equal(got, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2))
