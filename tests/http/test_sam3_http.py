"""SAM 3 route end to end: real server subprocess, real client, values against Sam3Processor directly.

The server loads a tiny SAM 3 (sam3's own classes, 224-px input) from a checkpoint file written
here in the released layout (``detector.`` keys, plus a ``tracker.`` key it must ignore). Its
scoring weights are scaled so that scores fall on both sides of the 0.5 threshold. References
run sam3's ``Sam3Processor`` on the same file in this process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from apis.sam3 import internals as sam3_internals
from apis.sam3.model import Sam3Arch, build_sam3_image
from clients.common import encode_image, post
from clients.sam3_client import Sam3ServiceClient, VisionServeError, decode_instance_mask
from tests import references
from tests.conftest import KEYS, ROOT, ServerProcess

ARCH = ROOT / "configs" / "models" / "sam3-tiny.json"
PROMPTS = ["a red car", "tree", "the dog on the left"]


def scene(h: int = 61, w: int = 45, seed: int = 0) -> np.ndarray:
    """Blobs plus noise: structure for masks, speckle for small regions."""
    yy, xx = np.mgrid[:h, :w]
    base = (np.sin(xx / 6.0 + seed) + np.cos(yy / 4.0 - seed)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 30, (h, w, 3))
    return np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_sam3_image(Sam3Arch.from_json(ARCH))
    sam3_internals.init_untrained(model)
    with torch.no_grad():  # spread the scores around 0.5 (untrained ones sit near 0.15)
        model.dot_prod_scoring.hs_proj.weight.mul_(8)
        model.transformer.decoder.presence_token_head.layers[-1].bias.fill_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def sam3_checkpoint(assets):
    path = assets / "sam3-tiny.pt"
    state = {f"detector.{k}": v for k, v in tiny_model().state_dict().items()}
    state["tracker.maskmem_tpos_enc"] = torch.zeros(3)  # the released file has a tracker too
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def processor(sam3_checkpoint):
    from sam3.model.sam3_image_processor import Sam3Processor

    model = build_sam3_image(Sam3Arch.from_json(ARCH))
    state = torch.load(sam3_checkpoint, weights_only=True)["model"]
    model.load_state_dict({k.removeprefix("detector."): v for k, v in state.items() if "detector." in k})
    return Sam3Processor(model.eval(), resolution=224, device="cpu")


@pytest.fixture(scope="module")
def sam3_server(tmp_path_factory, sam3_checkpoint, image_root, image_host):
    config = {
        "inputs": {
            "path": {"roots": [str(image_root)]},
            "url": {"enabled": True, "allowed_hosts": ["127.0.0.1"], "allow_private_networks": True},
        },
        "sam3": {
            "max_batch_size": 8,
            "batch_timeout": 0.2,
            "cache_size": 16,  # --cache-size below overrides it
            "prompt_chunk": 4,
            "models": [{"name": "sam3-tiny", "weights": str(sam3_checkpoint), "arch_config": str(ARCH)}],
        },
    }
    args = ["--api-key", KEYS[0], "--cache-size", "4"]
    server = ServerProcess(config, tmp_path_factory.mktemp("sam3-server"), args)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def client(sam3_server) -> Sam3ServiceClient:
    return Sam3ServiceClient(sam3_server.url + "/sam3", api_key=KEYS[0])


def info(server) -> dict:
    body = requests.get(server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    return body["families"]["sam3"]["workers"][0]


def raw_scores(processor, image: np.ndarray, prompt: str) -> np.ndarray:
    processor.confidence_threshold = 0.0
    state = processor.set_text_prompt(prompt, processor.set_image(Image.fromarray(image)))
    return state["scores"].numpy()


def reference(
    processor, image, prompt, score_threshold=0.5, epsilon_factor=0.02, min_area=100, boxes=(), labels=()
) -> list[dict]:
    """Sam3Processor's instances with the documented rules on top: best score first, box clipped
    to the image, polygon = approxPolyDP of the largest external contour, kept when that
    polygon's area >= min_area; empty masks have no polygon and are dropped. ``boxes`` (pixels)
    are added one by one after the text prompt, if any, as the processor takes them."""
    h, w = image.shape[:2]
    processor.confidence_threshold = score_threshold
    state = processor.set_image(Image.fromarray(image))
    if prompt is not None:
        state = processor.set_text_prompt(prompt, state)
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        cxcywh = [(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
        state = processor.add_geometric_prompt(cxcywh, bool(label), state)
    out = []
    for i in torch.argsort(state["scores"], descending=True, stable=True).tolist():
        mask = state["masks"][i, 0].numpy()
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            continue
        contour = max(contours, key=cv2.contourArea)
        poly = cv2.approxPolyDP(contour, epsilon_factor * cv2.arcLength(contour, True), True)
        if cv2.contourArea(poly) < min_area:
            continue
        x1, y1, x2, y2 = state["boxes"][i].tolist()
        box = [min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)]
        out.append(
            {
                "score": float(state["scores"][i]),
                "bbox": box,
                "polygon": poly.reshape(-1, 2).tolist(),
                "mask": mask,
            }
        )
    return out


def assert_matches(got: list[dict], want: list[dict], prompt: str) -> None:
    assert len(got) == len(want)
    for g, r in zip(got, want, strict=True):
        assert g["prompt"] == prompt
        assert g["score"] == pytest.approx(r["score"], abs=1e-5)
        np.testing.assert_allclose(g["bbox"], r["bbox"], atol=1e-3)
        assert g["polygon"] == r["polygon"]
        if "mask" in g:
            np.testing.assert_array_equal(decode_instance_mask(g), r["mask"])
        assert g["area"] == int(r["mask"].sum())


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("seed", [0, 1])
def test_instances_equal_sam3_processor_after_the_same_thresholds(client, processor, seed):
    image = scene(seed=seed)
    got = client.predict(image=image, prompts=PROMPTS, return_masks=True)
    assert got["image_size"] == {"width": 45, "height": 61}
    assert got["model"] == "sam3-tiny"
    assert [r["prompt"] for r in got["results"]] == sorted(
        (r["prompt"] for r in got["results"]), key=PROMPTS.index
    )  # prompt order kept
    for prompt in PROMPTS:
        scores = raw_scores(processor, image, prompt)
        assert (scores > 0.5).any() and (scores < 0.5).any()  # the threshold really selects
        mine = [r for r in got["results"] if r["prompt"] == prompt]
        assert_matches(mine, reference(processor, image, prompt), prompt)
        assert all(r["score"] > 0.5 for r in mine)


def test_rle_and_png_masks_decode_to_the_same_mask_and_area_is_its_pixel_count(client):
    image = scene(seed=2)
    rle = client.predict(image=image, prompts=["tree"], return_masks=True, mask_format="rle")["results"]
    png = client.predict(image=image, prompts=["tree"], return_masks=True, mask_format="png")["results"]
    assert rle and len(rle) == len(png)
    for a, b in zip(rle, png, strict=True):
        assert a["mask"]["format"] == "rle" and b["mask"]["format"] == "png"
        assert a["mask"]["shape"] == b["mask"]["shape"] == [61, 45]
        ma, mb = decode_instance_mask(a), decode_instance_mask(b)
        np.testing.assert_array_equal(ma, mb)
        coco = {"size": a["mask"]["data"]["size"], "counts": a["mask"]["data"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(coco).astype(bool), ma)  # standard COCO RLE
        assert a["area"] == b["area"] == int(ma.sum())
        assert a["area"] != int((a["bbox"][2] - a["bbox"][0]) * (a["bbox"][3] - a["bbox"][1]))
    plain = client.predict(image=image, prompts=["tree"])["results"]
    assert all("mask" not in r or r["mask"] is None for r in plain)
    assert [r["polygon"] for r in plain] == [r["polygon"] for r in rle]


def test_max_instances_keeps_each_prompts_best_instances(client):
    image = scene(seed=0)
    everything = client.predict(image=image, prompts=PROMPTS)["results"]
    best = client.predict(image=image, prompts=PROMPTS, max_instances=1)["results"]
    firsts = [
        next(r for r in everything if r["prompt"] == p)
        for p in PROMPTS
        if any(r["prompt"] == p for r in everything)
    ]
    assert len(everything) > len(best) == len(firsts) > 0
    assert best == firsts


def test_score_threshold_min_area_and_epsilon_including_explicit_zero(client, processor):
    image = scene(seed=3)
    prompt = "a red car"
    call = lambda **kw: client.predict(image=image, prompts=[prompt], **kw)["results"]  # noqa: E731
    default = call()
    everything = call(score_threshold=0, min_area=0)
    assert len(everything) > len(default)
    assert_matches(everything, reference(processor, image, prompt, 0.0, 0.02, 0), prompt)
    assert min(r["score"] for r in everything) < 0.5 < max(r["score"] for r in everything)
    processor.confidence_threshold = 0.0
    state = processor.set_text_prompt(prompt, processor.set_image(Image.fromarray(image)))
    nonempty = int(state["masks"].flatten(1).any(dim=1).sum())
    assert len(everything) == nonempty  # every instance but those with an empty mask

    high = call(score_threshold=0.6, min_area=0)
    assert_matches(high, reference(processor, image, prompt, 0.6, 0.02, 0), prompt)
    assert len(high) < len(everything)

    areas = sorted({cv2.contourArea(np.array(r["polygon"], np.int32)) for r in everything})
    cut = areas[len(areas) // 2]
    big = call(score_threshold=0, min_area=cut)
    assert 0 < len(big) < len(everything)
    assert all(cv2.contourArea(np.array(r["polygon"], np.int32)) >= cut for r in big)
    assert call(score_threshold=0, min_area=10**9) == []

    exact = call(score_threshold=0, min_area=0, epsilon_factor=0)
    coarse = call(score_threshold=0, min_area=0, epsilon_factor=0.2)
    assert_matches(exact, reference(processor, image, prompt, 0.0, 0.0, 0), prompt)
    assert sum(len(r["polygon"]) for r in exact) > sum(len(r["polygon"]) for r in coarse)


def test_exact_polygons_outline_the_largest_component_and_simplify_within_epsilon(client):
    """Independent of OpenCV's contour walk: with epsilon_factor 0 the filled polygon is the
    8-connected component of the mask, holes filled, whose outline encloses the most area
    (components and holes by flood fill, the area from 2x2 pixel blocks: ``references.py``),
    for masks of several components too;
    with epsilon_factor e the polygon keeps a subset of those corners and no exact corner is
    farther than e x perimeter from it (Douglas-Peucker's guarantee); its shoelace area is
    >= min_area."""
    image = scene(seed=3)
    args = {"prompts": ["a red car", "tree"], "score_threshold": 0, "return_masks": True}
    exact = client.predict(image=image, min_area=0, epsilon_factor=0, **args)["results"]
    simple = client.predict(image=image, min_area=0, epsilon_factor=0.05, **args)["results"]
    assert len(exact) == len(simple) > 3
    several = 0
    for e, s in zip(exact, simple, strict=True):
        mask = decode_instance_mask(e).astype(bool)
        several += len(references.components(mask)) > 1
        filled = np.zeros(mask.shape, np.uint8)
        cv2.fillPoly(filled, [np.array(e["polygon"], np.int32)], 1)
        assert any(np.array_equal(filled.astype(bool), r) for r in references.largest_outlines(mask))
        corners = np.array(e["polygon"], float)
        perimeter = np.linalg.norm(corners - np.roll(corners, 1, axis=0), axis=1).sum()
        kept = np.array(s["polygon"], float)
        assert {tuple(p) for p in s["polygon"]} <= {tuple(p) for p in e["polygon"]}
        assert max(_distance_to_polygon(p, kept) for p in corners) <= 0.05 * perimeter + 1e-6
    assert several >= 2, "the largest of several components must be chosen somewhere"
    for r in client.predict(image=image, min_area=40, **args)["results"]:
        x, y = np.array(r["polygon"], float).T
        assert 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) >= 40


def _distance_to_polygon(p: np.ndarray, poly: np.ndarray) -> float:
    """Distance from point p to the closed polyline through poly's corners."""
    best = np.inf
    for a, b in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        ab = b - a
        t = 0.0 if not ab.any() else np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0, 1)
        best = min(best, float(np.linalg.norm(p - (a + t * ab))))
    return best


def test_image_path_and_url_equal_base64(client, image_root, image_host):
    pixels = np.asarray(Image.open(image_root / "photo.png").convert("RGB"))
    kw = {"prompts": ["tree"], "score_threshold": 0, "min_area": 0}
    by_b64 = client.predict(image=pixels, **kw)
    by_path = client.predict(str(image_root / "photo.png"), **kw)
    by_url = client.predict(image_url=image_host + "/photo.png", **kw)
    assert by_b64["results"] and by_path == by_b64 == by_url
    assert by_path["image_size"] == {"width": 61, "height": 45}


# ----------------------------------------------------------------------------- cache and batching


def test_new_prompts_on_a_cached_image_skip_the_vision_backbone(sam3_server, client):
    image = scene(seed=11)
    model = "sam3-tiny"
    before = info(sam3_server)
    client.predict(image=image, prompts=["cat", "dog", "bird"])
    mid = info(sam3_server)
    assert mid["encoded_images"][model] == before["encoded_images"][model] + 1  # 3 prompts, 1 encoding
    assert mid["embedding_cache"][model]["misses"] == before["embedding_cache"][model]["misses"] + 1
    client.predict(image=encode_image(image), prompts=["horse"])
    after = info(sam3_server)
    assert after["encoded_images"][model] == mid["encoded_images"][model]
    assert after["embedding_cache"][model]["hits"] == mid["embedding_cache"][model]["hits"] + 1
    assert after["embedding_cache"][model]["capacity"] == 4  # from --cache-size
    assert after["encoded_prompts"][model] >= mid["encoded_prompts"][model] + 1


def test_concurrent_requests_batch_the_backbone_and_answer_like_the_processor(sam3_server, client, processor):
    """Images encoded together in one backbone batch answer what Sam3Processor gives for each
    image alone; the batch counters are read before and after, so only these requests count."""
    images = [scene(seed=200 + i) for i in range(6)]
    args = {"prompts": ["tree"], "score_threshold": 0, "min_area": 0}

    def batches() -> dict[int, int]:
        return {int(k): v for k, v in info(sam3_server)["forward_batch_sizes"].get("predict", {}).items()}

    def encoder() -> dict[str, int]:
        return info(sam3_server)["encoder_batch_sizes"]["sam3-tiny"]

    before, enc_before = batches(), encoder()
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda im: client.predict(image=im, **args), images))
    after, enc_after = batches(), encoder()
    assert any(n > 1 and after[n] > before.get(n, 0) for n in after), (before, after)
    # the image encoder itself: each new image once, several of them in one forward
    new = {int(k): v - enc_before.get(k, 0) for k, v in enc_after.items() if v != enc_before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == len(images) and max(new) > 1, new
    for image, got in zip(images, together, strict=True):
        assert_matches(got["results"], reference(processor, image, "tree", 0.0, 0.02, 0), "tree")


def test_concurrent_prompts_on_a_cached_image_share_one_detector_forward(sam3_server, client, processor):
    image = scene(seed=12)
    client.predict(image=image, prompts=["warm"])  # cached from now on
    before = info(sam3_server)["detector_batch_sizes"]["sam3-tiny"]
    prompts = ["a red car", "tree", "the dog on the left", "cat", "bird", "sky"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(
            pool.map(lambda p: client.predict(image=image, prompts=[p], return_masks=True), prompts)
        )
    after = info(sam3_server)["detector_batch_sizes"]["sam3-tiny"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == len(prompts)  # one query per request ...
    assert max(new) > 1  # ... and some of them shared a forward, at most prompt_chunk at a time
    assert max(new) <= 4
    for prompt, got in zip(prompts, answers, strict=True):
        assert_matches(got["results"], reference(processor, image, prompt), prompt)


def test_a_requests_prompts_run_prompt_chunk_at_a_time(sam3_server, client, processor):
    image = scene(seed=13)
    prompts = ["a", "b c", "tree", "the dog on the left", "sky", "a red car"]
    before = info(sam3_server)["detector_batch_sizes"]["sam3-tiny"]
    got = client.predict(image=image, prompts=prompts)
    after = info(sam3_server)["detector_batch_sizes"]["sam3-tiny"]
    assert {int(k): v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} == {4: 1, 2: 1}
    for prompt in prompts:
        mine = [r for r in got["results"] if r["prompt"] == prompt]
        assert_matches(mine, reference(processor, image, prompt), prompt)


# ----------------------------------------------------------------------------- exemplar boxes

BOX_CASES = {
    "one positive box": (None, [[3, 4, 30, 40]], None),
    "boxes alone, one negative": (None, [[0, 0, 45, 61], [10.5, 20, 40, 55]], [1, 0]),
    "text and boxes": (["a red car", "tree"], [[3, 4, 30, 40], [5, 30, 44, 60]], [1, 0]),
    "text and a negative box": (["tree"], [[5, 10, 40, 55]], [0]),
}


@pytest.mark.parametrize("case", BOX_CASES)
def test_box_prompts_equal_sam3_processor(client, processor, case):
    prompts, boxes, labels = BOX_CASES[case]
    image = scene(seed=4)
    got = client.predict(
        image=image, prompts=prompts or (), boxes=boxes, box_labels=labels, return_masks=True
    )
    labels = labels or [1] * len(boxes)
    for prompt in prompts or [None]:
        mine = [r for r in got["results"] if r["prompt"] == prompt]
        assert mine  # some instances pass the 0.5 threshold
        assert_matches(mine, reference(processor, image, prompt, boxes=boxes, labels=labels), prompt)
    assert {r["prompt"] for r in got["results"]} <= set(prompts or [None])
    plain = client.predict(image=image, prompts=prompts or ["visual"], score_threshold=0, min_area=0)
    boxed = client.predict(
        image=image,
        prompts=prompts or ["visual"],
        boxes=boxes,
        box_labels=labels,
        score_threshold=0,
        min_area=0,
    )
    assert [r["score"] for r in plain["results"]] != [r["score"] for r in boxed["results"]]  # boxes count


# ----------------------------------------------------------------------------- bad input


def test_server_refuses_to_start_on_a_checkpoint_that_does_not_fit(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"detector.nothing": torch.zeros(1)}}, bad)
    config = {"sam3": {"models": [{"name": "sam3-tiny", "weights": str(bad), "arch_config": str(ARCH)}]}}
    server = ServerProcess(config, tmp_path, ["--no-auth"])
    assert server.proc.wait(120) != 0
    server.stop()
    assert "does not fit the configured architecture" in server.log()
    assert str(bad) in server.log()


BAD = {
    "no prompts": ({"prompts": []}, 422, "at least 1"),
    "empty prompt": ({"prompts": [""]}, 422, "prompts[0] is blank"),
    "blank prompt": ({"prompts": ["cat", "   "]}, 422, "prompts[1] is blank"),
    "prompt not text": ({"prompts": [3]}, 422, "prompts"),
    "prompts not a list": ({"prompts": "cat"}, 422, "prompts"),
    "too many prompts": ({"prompts": ["x"] * 33}, 422, "at most 32"),
    "prompt too long": ({"prompts": ["x" * 2001]}, 400, "2001 characters"),
    "unknown mask_format": ({"prompts": ["cat"], "mask_format": "bmp"}, 422, "'rle' or 'png'"),
    "threshold above 1": ({"prompts": ["cat"], "score_threshold": 1.5}, 422, "score_threshold"),
    "negative min_area": ({"prompts": ["cat"], "min_area": -1}, 422, "min_area"),
    "unknown model": ({"prompts": ["cat"], "model": "sam9"}, 400, "offers: sam3-tiny"),
    "unknown field": ({"prompts": ["cat"], "box": [1, 2, 3, 4]}, 422, "box"),
    "no prompts nor boxes": ({}, 422, "give prompts, boxes, or both"),
    "empty box list": ({"boxes": []}, 422, "at least 1"),
    "empty box": ({"boxes": [[10, 10, 10, 20]]}, 422, "boxes[0] [10.0, 10.0, 10.0, 20.0] is empty"),
    "inverted box": ({"prompts": ["cat"], "boxes": [[1, 1, 5, 5], [20, 10, 5, 30]]}, 422, "boxes[1]"),
    "box of 3 numbers": ({"boxes": [[1, 2, 3]]}, 422, "4 numbers"),
    "box outside the image": ({"boxes": [[10, 10, 46, 20]]}, 400, "outside the 45x61 image"),
    "negative box": ({"boxes": [[-1, 0, 5, 5]]}, 400, "boxes[0] [-1.0, 0.0, 5.0, 5.0] is outside"),
    "labels do not match": ({"boxes": [[1, 1, 5, 5]], "box_labels": [1, 0]}, 422, "2 labels for 1 boxes"),
    "labels without boxes": ({"prompts": ["cat"], "box_labels": [1]}, 422, "box_labels needs boxes"),
    "label not 0 or 1": ({"boxes": [[1, 1, 5, 5]], "box_labels": [2]}, 422, "box_labels[0] is 2"),
    "too many boxes": ({"boxes": [[1, 1, 5, 5]] * 33}, 422, "at most 32"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_a_4xx_that_says_what_to_fix(sam3_server, case):
    body, status, words = BAD[case]
    with pytest.raises(VisionServeError) as err:
        post("sam3", "predict", {"image": encode_image(scene()), **body}, sam3_server.url + "/sam3", KEYS[0])
    assert err.value.status == status
    assert words in err.value.message


@pytest.mark.parametrize(
    "path, words",
    [
        ("/etc/passwd", "inside one of"),
        ("../photo.png", "inside one of"),
        ("missing.png", "does not exist"),
    ],
)
def test_bad_image_paths_are_refused_and_the_server_keeps_serving(client, image_root, path, words):
    target = path if path.startswith("/") else str(image_root / path)
    with pytest.raises(VisionServeError) as err:
        client.predict(target, prompts=["cat"])
    assert 400 <= err.value.status < 500
    assert words in err.value.message.lower()
    assert client.predict(image=scene(), prompts=["cat"])["image_size"]["width"] == 45


def test_a_broken_image_in_a_batch_fails_alone(sam3_server, client):
    good = encode_image(scene(seed=5))
    broken = encode_image(scene(seed=6))[:200]
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(post, "sam3", "predict", {"image": im, "prompts": ["cat"]}, client.base_url, KEYS[0])
            for im in (good, broken, good, broken)
        ]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result()["image_size"]["width"])
        except VisionServeError as e:
            outcomes.append(e.status)
    assert outcomes[0] == outcomes[2] == 45
    assert outcomes[1] == outcomes[3] == 400


def test_key_is_required(sam3_server):
    r = requests.post(sam3_server.url + "/sam3/predict", json={"image": "x", "prompts": ["cat"]})
    assert r.status_code == 401
    assert requests.get(sam3_server.url + "/sam3/health").json()["status"] == "ok"
