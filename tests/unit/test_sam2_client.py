"""The SAM 2 client without a server: decoders against pycocotools, payloads, and the overlay writer."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from clients import common
from clients import masks as cm
from clients import sam2_client as sc
from clients.common import decode_array


def masks() -> list[np.ndarray]:
    """Random, blob, empty, full, diagonal and large masks: short runs, long runs that need several
    characters in a COCO string, and run differences of both signs."""
    rng = np.random.default_rng(0)
    blob = np.zeros((37, 53), bool)
    blob[5:30, 10:40] = True
    big = np.zeros((300, 410), bool)
    big[20:280, 30:200] = True
    big[100:110, 250:400] = True
    big[rng.random(big.shape) > 0.999] ^= True
    return [
        rng.random((37, 53)) > 0.5,
        rng.random((64, 20)) > 0.9,
        blob,
        np.zeros((12, 7), bool),
        np.ones((12, 7), bool),
        np.eye(40, dtype=bool),
        big,
        np.ones((300, 410), bool),
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
    ]


MASKS = masks()


def column_major_runs(m: np.ndarray) -> list[int]:
    """SAM's uncompressed RLE, written the slow obvious way."""
    runs, current, n = [], False, 0
    for v in m.T.ravel():
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    return [*runs, n]


def coco_text(m: np.ndarray) -> dict:
    coco = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": coco["size"], "counts": coco["counts"].decode()}


@pytest.mark.parametrize("i", range(len(MASKS)))
def test_coco_and_uncompressed_rle_decode_to_the_mask(i):
    m = MASKS[i]
    text = coco_text(m)
    assert cm._coco_counts(text["counts"]) == column_major_runs(m)
    got = sc.decode_rle(text)
    assert got.dtype == bool and got.shape == m.shape
    np.testing.assert_array_equal(got, m)
    np.testing.assert_array_equal(got, coco_mask.decode({**text, "counts": text["counts"].encode()}) > 0)
    raw = {"size": list(m.shape), "counts": column_major_runs(m)}
    np.testing.assert_array_equal(sc.decode_rle(raw), m)
    np.testing.assert_array_equal(sc.decode_segmentation({"segmentation": text}), m)
    np.testing.assert_array_equal(sc.decode_segmentation({"segmentation": raw}), m)


def test_coco_counts_as_bytes_and_known_strings():
    m = MASKS[0]
    coco = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    np.testing.assert_array_equal(sc.decode_rle(coco), m)  # pycocotools' own dict, bytes counts
    assert cm._coco_counts("") == []
    # A 2x2 mask with only its last pixel set: runs [3, 1]; 3 -> "3", 1 -> "1".
    np.testing.assert_array_equal(sc.decode_rle({"size": [2, 2], "counts": "31"}), [[0, 0], [0, 1]])


def test_uncompressed_rle_is_column_major_and_checks_its_length():
    # Column-major runs [1, 2, 3]: pixel (0,0) background, then (1,0) and (0,1) masked.
    got = sc.decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    np.testing.assert_array_equal(got, [[0, 1, 0], [1, 0, 0]])
    assert sc.decode_rle({"size": [2, 3], "counts": [0, 6]}).all()
    with pytest.raises(ValueError, match="6 pixels"):
        sc.decode_rle({"size": [2, 3], "counts": [1, 2]})


def binary_entry(m: np.ndarray, encoding: str) -> dict:
    if encoding == "float32":
        data = base64.b64encode(m.astype("<f4").tobytes()).decode()
    elif encoding == "packbits":
        data = base64.b64encode(np.packbits(m.ravel(order="C")).tobytes()).decode()
    else:
        buf = io.BytesIO()
        Image.fromarray(m.astype(np.uint8) * 255, "L").save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode()
    return {"segmentation": data, "segmentation_shape": list(m.shape)}


@pytest.mark.parametrize("encoding", ["float32", "packbits", "png"])
@pytest.mark.parametrize("i", [0, 1, 3, 4, 8])
def test_binary_encodings_decode_with_and_without_the_encoding_name(encoding, i):
    m = MASKS[i]  # 37x53 = 1961 pixels is not a whole number of packbits bytes
    entry = binary_entry(m, encoding)
    for got in (sc.decode_segmentation(entry, encoding), sc.decode_segmentation(entry)):
        assert got.dtype == bool and got.shape == m.shape
        np.testing.assert_array_equal(got, m)


def test_decode_segmentation_rejects_mismatched_data():
    entry = binary_entry(MASKS[0], "packbits")
    with pytest.raises(ValueError, match="bytes"):
        sc.decode_segmentation({**entry, "segmentation_shape": [40, 53]}, "packbits")
    with pytest.raises(ValueError, match="unknown"):
        sc.decode_segmentation(entry, "jpeg")
    decoded = {"segmentation": MASKS[2]}
    assert sc.decode_segmentation(decoded) is MASKS[2]


@pytest.mark.parametrize("shape", [(64, 64), (1, 256, 256)])
def test_mask_input_round_trip(shape):
    low = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    data, got_shape = sc.encode_mask_input(low)
    assert got_shape == [1, shape[-2], shape[-1]]
    np.testing.assert_array_equal(decode_array(data, got_shape), low.reshape(got_shape))
    with pytest.raises(ValueError, match="shape"):
        sc.encode_mask_input(np.zeros(5))


def overlay(tmp_path, image, mask_list, **kw) -> np.ndarray:
    path = sc.save_mask_overlay(image, mask_list, tmp_path / "overlay.png", **kw)
    assert path == tmp_path / "overlay.png" and path.read_bytes().startswith(b"\x89PNG")
    return np.asarray(Image.open(path))


def test_overlay_colours_exactly_the_masked_pixels(tmp_path):
    # Pixels no brighter than 30 and colours from 40 up: every blended pixel changes.
    image = np.random.default_rng(2).integers(0, 31, (37, 53, 3), dtype=np.uint8)
    m1, m2 = MASKS[2], np.zeros((37, 53), bool)
    m2[0:3, 0:3] = True
    m3 = MASKS[0].astype(np.float32)  # 0/1 floats, overlapping m1
    out = overlay(tmp_path, image, [m1, {"segmentation": m2}, m3])
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != image).any(axis=-1)
    np.testing.assert_array_equal(changed, m1 | m2 | (m3 > 0))

    colours = np.random.default_rng(0).integers(40, 256, size=(3, 3))
    only_m2 = m2 & ~m1 & ~(m3 > 0)
    want = np.round(0.5 * image[only_m2] + 0.5 * colours[1]).astype(np.uint8)
    np.testing.assert_array_equal(out[only_m2], want)
    both = m1 & (m3 > 0)
    want = np.round(0.5 * (0.5 * image[both] + 0.5 * colours[0]) + 0.5 * colours[2]).astype(np.uint8)
    np.testing.assert_array_equal(out[both], want)


def test_overlay_inputs_seed_and_alpha(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    m = np.zeros((20, 30), bool)
    m[5:15, 5:25] = True
    src = tmp_path / "image.png"
    Image.fromarray(image).save(src)
    from_array = overlay(tmp_path, image, [m], seed=7)
    np.testing.assert_array_equal(overlay(tmp_path, src, [m], seed=7), from_array)
    np.testing.assert_array_equal(overlay(tmp_path, str(src), m[None], seed=7), from_array)
    np.testing.assert_array_equal(overlay(tmp_path, Image.fromarray(image), [m], seed=7), from_array)
    assert not np.array_equal(overlay(tmp_path, image, [m], seed=8), from_array)
    np.testing.assert_array_equal(overlay(tmp_path, image, [m], alpha=0.0), image)
    np.testing.assert_array_equal(overlay(tmp_path, image, []), image)
    grey = overlay(tmp_path, image[..., 0], [m], seed=7)
    assert grey.shape == (20, 30, 3)
    np.testing.assert_array_equal(grey[~m], np.repeat(image[..., :1], 3, axis=-1)[~m])
    with pytest.raises(ValueError, match="does not fit"):
        sc.save_mask_overlay(image, [m.T], tmp_path / "bad.png")


class FakePost:
    """Stands in for ``common.post``: records the request, answers with ``reply``."""

    def __init__(self, reply: dict):
        self.reply, self.calls = reply, []

    def __call__(self, family, route, payload, base_url=None, api_key=None, timeout=600.0, headers=None):
        self.calls.append(
            dict(family=family, route=route, payload=payload, base_url=base_url, timeout=timeout)
        )
        return self.reply


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, "<f4").tobytes()).decode()


def test_auto_mask_payload_sends_every_field(monkeypatch):
    fake = FakePost({"masks": [], "num_masks": 0, "mask_encoding": "float32"})
    monkeypatch.setattr(common, "post", fake)
    grid = np.array([[0.25, 0.25], [0.75, 0.75]])
    r = sc.generate_sam2_auto_masks(
        image="aGVsbG8=", preset="coarse", points_per_side=None, point_grids=[grid], output_mode="coco_rle",
        base_url="http://x/sam2", timeout=5.0,
    )  # fmt: skip
    assert r["num_masks"] == 0
    (call,) = fake.calls
    assert (call["family"], call["route"], call["base_url"], call["timeout"]) == (
        "sam2", "auto_mask", "http://x/sam2", 5.0
    )  # fmt: skip
    p = call["payload"]
    assert p["image"] == "aGVsbG8=" and "image_url" not in p
    assert p["preset"] == "coarse" and p["output_mode"] == "coco_rle" and p["mask_encoding"] == "float32"
    assert p["point_grids"] == [[[0.25, 0.25], [0.75, 0.75]]] and isinstance(p["point_grids"][0], list)
    for key in ("points_per_side", "pred_iou_thresh", "crop_n_layers", "use_m2m", "model_cfg"):
        assert key in p and p[key] is None


def test_auto_masks_decoded_handles_every_form(monkeypatch, tmp_path):
    m = MASKS[0]
    raw = {"size": list(m.shape), "counts": column_major_runs(m)}
    reply = {
        "masks": [
            {"segmentation": coco_text(m), "area": int(m.sum())},
            {"segmentation": raw, "area": int(m.sum())},
            {**binary_entry(m, "packbits"), "area": int(m.sum())},
        ],
        "num_masks": 3,
        "mask_encoding": "packbits",
    }
    fake = FakePost(reply)
    monkeypatch.setattr(common, "post", fake)
    src = tmp_path / "image.jpg"
    src.write_bytes(b"not really a jpeg")
    got = sc.generate_sam2_auto_masks_decoded(str(src), preset="coarse")
    assert fake.calls[0]["payload"]["image"] == base64.b64encode(b"not really a jpeg").decode()
    assert len(got) == 3
    for entry in got:
        assert entry["area"] == m.sum()
        np.testing.assert_array_equal(entry["segmentation"], m)


def test_prompt_masks_payload_and_decoded_answer(monkeypatch):
    rng = np.random.default_rng(4)
    want_masks = (rng.random((3, 8, 10)) > 0.5).astype(np.float32)
    want_iou = rng.random(3).astype(np.float32)
    want_low = rng.normal(size=(3, 4, 4)).astype(np.float32)
    reply = {
        "masks": b64(want_masks), "masks_shape": [3, 8, 10],
        "iou_predictions": b64(want_iou), "iou_shape": [3],
        "low_res_masks": b64(want_low), "low_res_shape": [3, 4, 4],
        "model": "tiny",
    }  # fmt: skip
    fake = FakePost(reply)
    monkeypatch.setattr(common, "post", fake)

    got = sc.generate_sam2_prompt_masks(
        image="aGVsbG8=", point_coords=np.array([[5, 6], [7, 8]]), point_labels=np.array([1, 0])
    )
    for g, w in zip(got, (want_masks, want_iou, want_low), strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, w)
    p = fake.calls[-1]["payload"]
    assert fake.calls[-1]["route"] == "prompt_mask"
    assert p["point_coords"] == [[5, 6], [7, 8]] and p["point_labels"] == [1, 0] and p["box"] is None
    assert p["mask_input"] is None and p["mask_input_shape"] is None
    assert (p["multimask_output"], p["return_logits"], p["normalize_coords"]) == (True, False, True)
    assert (p["mask_threshold"], p["max_hole_area"], p["max_sprinkle_area"]) == (0.0, 0.0, 0.0)

    sc.generate_sam2_prompt_masks(image="aGVsbG8=", box=[1, 2, 3, 4], mask_input=got[2][1:2])
    p = fake.calls[-1]["payload"]
    assert p["box"] == [1, 2, 3, 4] and p["mask_input_shape"] == [1, 4, 4]
    np.testing.assert_array_equal(decode_array(p["mask_input"], [1, 4, 4]), want_low[1:2])

    sc.generate_sam2_prompt_masks(image="aGVsbG8=", mask_input="AAAA", mask_input_shape=[1, 1, 1])
    assert fake.calls[-1]["payload"]["mask_input"] == "AAAA"


def test_prompt_shortcuts_send_their_prompts(monkeypatch, tmp_path):
    zeros = b64(np.zeros(1))
    reply = {"masks": zeros, "masks_shape": [1, 1, 1], "iou_predictions": zeros, "iou_shape": [1],
             "low_res_masks": zeros, "low_res_shape": [1, 1, 1]}  # fmt: skip
    fake = FakePost(reply)
    monkeypatch.setattr(common, "post", fake)
    src = tmp_path / "image.jpg"
    src.write_bytes(b"jpeg bytes")
    image = base64.b64encode(b"jpeg bytes").decode()

    sc.sam2_point_mask(str(src), point_coords=[[520, 820]], point_labels=[1])
    sc.sam2_box_mask(str(src), box=[280, 440, 1474, 1225])
    sc.sam2_combined_mask(str(src), point_coords=[[520, 820]], point_labels=[1], box=[280, 440, 1474, 1225])
    masks_np, iou_np, low_np = sc.generate_sam2_prompt_masks_decoded(
        image_url="http://example.com/a.jpg", box=[0, 0, 1, 1], multimask_output=False
    )
    assert masks_np.shape == (1, 1, 1) and iou_np.shape == (1,) and low_np.shape == (1, 1, 1)
    sent = [c["payload"] for c in fake.calls]
    assert [p.get("image") for p in sent] == [image, image, image, None]
    assert sent[3]["image_url"] == "http://example.com/a.jpg" and sent[3]["multimask_output"] is False
    assert [(p["point_coords"], p["point_labels"], p["box"]) for p in sent[:3]] == [
        ([[520, 820]], [1], None),
        (None, None, [280, 440, 1474, 1225]),
        ([[520, 820]], [1], [280, 440, 1474, 1225]),
    ]
