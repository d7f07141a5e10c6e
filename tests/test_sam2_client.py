"""The SAM 2 client's decoders and overlay writer, without a server (pycocotools as the reference)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from clients import sam2_client as sc
from clients.common import decode_array


def masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blob = np.zeros((37, 53), bool)
    blob[5:30, 10:40] = True
    return [
        rng.random((37, 53)) > 0.5,
        rng.random((64, 20)) > 0.9,
        blob,
        np.zeros((12, 7), bool),
        np.ones((12, 7), bool),
        np.eye(40, dtype=bool),
    ]


def column_major_runs(m: np.ndarray) -> list[int]:
    flat = m.T.ravel()
    runs, current, n = [], False, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    return [*runs, n]


@pytest.mark.parametrize("i", range(6))
def test_coco_and_uncompressed_rle_decode_to_the_mask(i):
    m = masks()[i]
    coco = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    text = {"size": coco["size"], "counts": coco["counts"].decode()}
    np.testing.assert_array_equal(sc.decode_rle(text), m)
    raw = {"size": list(m.shape), "counts": column_major_runs(m)}
    np.testing.assert_array_equal(sc.decode_rle(raw), m)
    np.testing.assert_array_equal(sc.decode_segmentation({"segmentation": text}), m)


@pytest.mark.parametrize("encoding", ["float32", "packbits", "png"])
def test_binary_encodings_decode_with_and_without_the_encoding_name(encoding):
    m = masks()[0]
    if encoding == "float32":
        data = base64.b64encode(m.astype("<f4").tobytes()).decode()
    elif encoding == "packbits":
        data = base64.b64encode(np.packbits(m.ravel()).tobytes()).decode()
    else:
        buf = io.BytesIO()
        Image.fromarray(m.astype(np.uint8) * 255, "L").save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode()
    entry = {"segmentation": data, "segmentation_shape": list(m.shape)}
    np.testing.assert_array_equal(sc.decode_segmentation(entry, encoding), m)
    np.testing.assert_array_equal(sc.decode_segmentation(entry), m)


def test_mask_input_round_trip():
    low = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    data, shape = sc.encode_mask_input(low)
    assert shape == [1, 64, 64]
    np.testing.assert_array_equal(decode_array(data, shape)[0], low)


def test_overlay_colours_exactly_the_masked_pixels(tmp_path):
    image = np.random.default_rng(2).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    m1, m2 = masks()[2], np.zeros((37, 53), bool)
    m2[0:3, 0:3] = True
    path = sc.save_mask_overlay(image, [m1, {"segmentation": m2}], tmp_path / "overlay.png")
    out = np.asarray(Image.open(path))
    assert out.shape == image.shape
    changed = (out != image).any(axis=-1)
    assert not changed[~(m1 | m2)].any()
    assert changed[m1 | m2].mean() > 0.95  # a colour equal to the pixel may leave one unchanged
