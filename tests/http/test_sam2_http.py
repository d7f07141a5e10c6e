"""SAM 2 routes end to end: real server subprocess, real client, values against sam2 directly.

The server loads a tiny SAM 2.1 (the real sam2 classes, 256-px input) from a checkpoint file
written here; references call ``SAM2ImagePredictor`` on the same file in this process.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import requests
import torch
from pycocotools import mask as coco_mask

from clients import sam2_client as sc
from clients.common import VisionServeError, encode_image, post
from tests.conftest import KEYS, ROOT, ServerProcess

ARCH = ROOT / "configs" / "models" / "sam2-tiny.json"
SPEC = json.loads(ARCH.read_text())


def build_tiny(ckpt=None):
    from sam2.build_sam import build_sam2

    return build_sam2(SPEC["config"], ckpt, device="cpu", hydra_overrides_extra=SPEC["overrides"])


def scene(h: int = 72, w: int = 96, seed: int = 0) -> np.ndarray:
    """Blobs plus noise: structured enough for masks, speckled enough for small regions."""
    yy, xx = np.mgrid[:h, :w]
    base = (np.sin(xx / 7.0 + seed) + np.cos(yy / 5.0)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 25, (h, w, 3))
    return np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sam2_checkpoint(assets):
    torch.manual_seed(0)
    path = assets / "sam2-tiny.pt"
    torch.save({"model": build_tiny().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def reference(sam2_checkpoint):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    pred = SAM2ImagePredictor(build_tiny(str(sam2_checkpoint)))
    s = pred.model.image_size
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return pred


@pytest.fixture(scope="module")
def sam2_server(tmp_path_factory, sam2_checkpoint, image_root):
    config = {
        "limits": {"max_response_bytes": 16 * 1024 * 1024},
        "inputs": {"path": {"roots": [str(image_root)]}},
        "sam2": {
            "max_batch_size": 8,
            "batch_timeout": 0.2,
            "cache_size": 16,  # --cache-size below overrides it
            "models": [
                {"name": "sam2.1_hiera_t", "weights": str(sam2_checkpoint), "arch_config": str(ARCH)},
                {"name": "sam2_hiera_t", "weights": "random", "arch_config": str(ARCH)},
            ],
        },
    }
    args = ["--api-key", KEYS[0], "--cache-size", "4"]
    server = ServerProcess(config, tmp_path_factory.mktemp("sam2-server"), args)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def kw(sam2_server):
    return {"base_url": sam2_server.url + "/sam2", "api_key": KEYS[0]}


def info(server) -> dict:
    body = requests.get(server.url + "/info", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    return body["families"]["sam2"]["workers"][0]


def direct(pred, image: np.ndarray, **prompt):
    pred.set_image(image)
    args = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in prompt.items()}
    return pred.predict(**args)


def assert_same_answer(got, want, logits: bool = False):
    (gm, gi, gl), (wm, wi, wl) = got, want
    assert gm.shape == wm.shape and gi.shape == wi.shape and gl.shape == wl.shape
    np.testing.assert_allclose(gi, wi, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gl, wl, rtol=1e-4, atol=1e-4)
    if logits:
        np.testing.assert_allclose(gm, wm, rtol=1e-4, atol=1e-4)
    else:
        assert set(np.unique(gm)) <= {0.0, 1.0}
        assert np.mean(gm != wm) < 1e-3  # a pixel exactly at the threshold may round either way


# ----------------------------------------------------------------------------- prompt_mask


PROMPTS = {
    "one point": {"point_coords": [[30, 20]], "point_labels": [1]},
    "two points, one negative": {"point_coords": [[30, 20], [70, 50]], "point_labels": [1, 0]},
    "box": {"box": [10, 10, 60, 50]},
    "box and points": {"box": [10, 10, 60, 50], "point_coords": [[30, 30]], "point_labels": [1]},
    "single mask": {"point_coords": [[50, 40]], "point_labels": [1], "multimask_output": False},
    "logits": {"point_coords": [[50, 40]], "point_labels": [1], "return_logits": True},
    "normalised coordinates": {
        "point_coords": [[30 / 96, 20 / 72]],
        "point_labels": [1],
        "box": [0.1, 0.1, 0.6, 0.7],
        "normalize_coords": False,
    },
}


@pytest.mark.parametrize("case", PROMPTS)
def test_prompt_masks_equal_the_predictor(reference, kw, case):
    image = scene()
    got = sc.generate_sam2_prompt_masks(image=encode_image(image), **PROMPTS[case], **kw)
    want = direct(reference, image, **PROMPTS[case])
    assert got[0].shape == ((1 if case == "single mask" else 3), 72, 96) and got[2].shape[1:] == (64, 64)
    assert_same_answer(got, want, logits=case == "logits")


@pytest.mark.parametrize(
    ("prompt_threads", "parallel", "trace"), [(1, 1, False), (1, 2, False), (0, 0, False), (0, 0, True)]
)
def test_a_batch_of_prompts_decoded_at_once_equals_the_predictor(
    request, reference, sam2_checkpoint, prompt_threads, parallel, trace
):
    """``decode_prompts`` on every PROMPTS case over two images, plus an image that is not cached:
    one after another (``parallel_prompts`` 1), on two threads of one torch thread each (a fixed
    ``prompt_threads`` or the adaptive 0), eager or traced (``trace_decoder``): each answer is the
    library's, the decoder ran on the threads asked for, and traced, Python ran it only to trace
    each kind of prompt once. Each image's share of the decoder is computed once, at its first
    prompt without a mask input; a prompt with one computes its own. Then a lone click: on all the
    worker's threads when adaptive."""
    import threading

    from apis.core.settings import ModelEntry
    from apis.sam2 import model

    entry = ModelEntry(name="sam2.1_hiera_t", weights=str(sam2_checkpoint), arch_config=str(ARCH))
    pred = model.load_sam2(
        entry, "cpu", prompt_threads=prompt_threads, parallel_prompts=parallel, trace_decoder=trace
    )
    decoder = pred.model.sam_mask_decoder
    ran: list[tuple[str, int]] = []
    decoder.iou_prediction_head.register_forward_hook(
        lambda *_: ran.append((threading.current_thread().name, torch.get_num_threads()))
    )
    image_sides: list[int] = []
    decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.register_forward_hook(
        lambda _m, args, _out: image_sides.append(args[0].shape[1])
    )
    images = [scene(seed=50), scene(seed=51)]
    embs = pred.embeddings(["a", "b"], images)
    cases = [(i, case) for case in PROMPTS for i in range(2)]
    prompts = [model.Prompt(**PROMPTS[case]) for _, case in cases]
    threads = torch.get_num_threads()
    if threads != 2:  # a worker's two threads, whatever this test process was given
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
        threads = 2
    decoded = model.decode_prompts(pred, [*(embs[i] for i, _ in cases), None], [*prompts, prompts[0]])
    assert decoded[-1] is None and torch.get_num_threads() == threads
    for (i, case), prompt, dec in zip(cases, prompts, decoded, strict=False):
        got = model.prompt_masks(pred, prompt, dec)
        assert_same_answer(got, direct(reference, images[i], **PROMPTS[case]), logits=prompt.return_logits)
    names = {name for name, _ in ran}
    if trace:  # points, box, both, one mask: the four kinds among the cases
        assert len(ran) == 4
    elif parallel == 1:
        assert names == {threading.current_thread().name} and len(ran) == len(cases)
    else:
        assert len(names) == 2 and all(n.startswith("sam2-decoder") for n in names), names
        assert {threads for _, threads in ran} == {1}
    masked = sum(p.mask_input is not None for p in prompts)
    image_tokens = embs[0].image_embed.shape[-1] * embs[0].image_embed.shape[-2]
    # once per image, plus each mask-input prompt's own (traced: only while tracing its kind)
    assert image_sides.count(image_tokens) == 2 + (min(masked, 1) if trace else masked)
    ran.clear()
    model.decode_prompts(pred, [embs[0]], [prompts[0]])
    if not trace:
        assert ran == [(threading.current_thread().name, prompt_threads or threads)]


def test_packbits_prompt_masks_decode_to_the_float32_ones_in_a_smaller_answer(kw):
    body = {"image": encode_image(scene()), **PROMPTS["one point"]}
    plain = sc.generate_sam2_prompt_masks(**body, **kw)
    packed = sc.generate_sam2_prompt_masks(**body, mask_encoding="packbits", **kw)
    assert packed[0].dtype == np.float32 and np.array_equal(packed[0], plain[0])
    np.testing.assert_array_equal(packed[1], plain[1])
    sizes = {
        enc: len(post("sam2", "prompt_mask", {**body, "mask_encoding": enc}, **kw)["masks"])
        for enc in ("float32", "packbits")
    }
    assert sizes["packbits"] * 30 < sizes["float32"]
    with pytest.raises(VisionServeError) as err:
        post("sam2", "prompt_mask", {**body, "mask_encoding": "packbits", "return_logits": True}, **kw)
    assert err.value.status == 422 and "cannot carry return_logits" in err.value.message


CLICK = {"best_only": True, "mask_encoding": "coco_rle", "return_low_res_masks": False}  # the compact form


@pytest.mark.parametrize("case", ["one point", "box and points", "single mask"])
def test_best_only_is_the_library_predictors_highest_iou_mask(reference, kw, case):
    image = scene(seed=41)
    body = {"image": encode_image(image), **PROMPTS[case]}
    masks, iou, low = sc.generate_sam2_prompt_masks(**body, best_only=True, **kw)
    want_m, want_i, want_l = direct(reference, image, **PROMPTS[case])
    best = int(np.argmax(want_i))
    assert masks.shape == (1, 72, 96) and iou.shape == (1,) and low.shape == (1, 64, 64)
    assert_same_answer(
        (masks, iou, low), (want_m[best : best + 1], want_i[best : best + 1], want_l[best : best + 1])
    )


def test_coco_rle_masks_decode_to_the_library_predictors_pixels(reference, kw):
    image = scene(seed=42)
    body = {"image": encode_image(image), **PROMPTS["two points, one negative"]}
    r = post("sam2", "prompt_mask", {**body, "mask_encoding": "coco_rle"}, **kw)
    want, _, _ = direct(reference, image, **PROMPTS["two points, one negative"])
    assert r["masks_shape"] == [3, 72, 96] and len(r["masks"]) == 3
    by_coco = np.stack([coco_mask.decode({**m, "counts": m["counts"].encode()}) for m in r["masks"]])
    masks, _, _ = sc.decode_prompt_answer(r)
    np.testing.assert_array_equal(by_coco, masks)  # pycocotools and the client read the same pixels
    packed, _, _ = sc.generate_sam2_prompt_masks(**body, mask_encoding="packbits", **kw)
    np.testing.assert_array_equal(masks, packed)
    assert np.mean(masks != want) < 1e-3
    with pytest.raises(VisionServeError) as err:
        post("sam2", "prompt_mask", {**body, "mask_encoding": "coco_rle", "return_logits": True}, **kw)
    assert err.value.status == 422 and "coco_rle carries 0/1 masks" in err.value.message


def test_low_res_masks_in_float16_or_left_out(reference, kw):
    image = scene(seed=43)
    body = {"image": encode_image(image), **PROMPTS["one point"]}
    _, _, want = direct(reference, image, **PROMPTS["one point"])
    r = post("sam2", "prompt_mask", {**body, "low_res_dtype": "float16"}, **kw)
    assert r["low_res_dtype"] == "float16" and r["low_res_shape"] == [3, 64, 64]
    _, _, half = sc.decode_prompt_answer(r)
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, want.astype(np.float16).astype(np.float32), rtol=1e-3, atol=2e-3)
    full = post("sam2", "prompt_mask", body, **kw)
    assert len(r["low_res_masks"]) * 2 <= len(full["low_res_masks"]) + 4
    masks, iou, low = sc.generate_sam2_prompt_masks(**body, return_low_res_masks=False, **kw)
    assert low is None and masks.shape == (3, 72, 96)
    bare = post("sam2", "prompt_mask", {**body, "return_low_res_masks": False}, **kw)
    assert bare["low_res_masks"] is None and bare["low_res_shape"] is None


def test_the_compact_click_answer_is_the_best_mask_in_a_fraction_of_the_bytes(reference, kw):
    image = scene(seed=44)
    body = {"image": encode_image(image), **PROMPTS["one point"]}
    compact = post("sam2", "prompt_mask", {**body, **CLICK}, **kw)
    seed = post("sam2", "prompt_mask", body, **kw)
    assert set(seed) == set(compact) and seed["low_res_dtype"] == "float32"  # defaults: the seed's answer
    masks, iou, low = sc.decode_prompt_answer(compact)
    want_m, want_i, _ = direct(reference, image, **PROMPTS["one point"])
    best = int(np.argmax(want_i))
    assert low is None and np.mean(masks[0] != want_m[best]) < 1e-3
    np.testing.assert_allclose(iou, want_i[best : best + 1], rtol=1e-4, atol=1e-5)
    assert len(json.dumps(compact)) * 20 < len(json.dumps(seed))


def test_follow_up_with_the_previous_low_res_mask(reference, kw):
    image = scene(seed=3)
    first = sc.generate_sam2_prompt_masks(image=encode_image(image), **PROMPTS["one point"], **kw)
    best = first[2][np.argmax(first[1])][None]  # (1, 64, 64) logits
    follow = {"point_coords": [[30, 20], [60, 40]], "point_labels": [1, 1], "multimask_output": False}
    got = sc.generate_sam2_prompt_masks(image=encode_image(image), mask_input=best, **follow, **kw)
    want = direct(reference, image, mask_input=best, **follow)
    assert_same_answer(got, want)
    without = sc.generate_sam2_prompt_masks(image=encode_image(image), **follow, **kw)
    assert not np.allclose(without[2], got[2])  # the mask prompt mattered


def test_hole_and_sprinkle_filling_equal_the_library_predictor(kw, sam2_checkpoint, monkeypatch):
    """sam2's own ``SAM2ImagePredictor(max_hole_area=..., max_sprinkle_area=...)``, its CUDA
    connected-components kernel stood in for by OpenCV, on the same weights."""
    import sam2.utils.misc
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", kernel_on_cpu)
    image = scene(seed=5)
    prompt = {"point_coords": [[40, 30]], "point_labels": [1]}
    plain = sc.generate_sam2_prompt_masks(image=encode_image(image), **prompt, **kw)
    for hole, sprinkle in [(40, 10), (0, 25), (15, 0)]:
        filled = sc.generate_sam2_prompt_masks(
            image=encode_image(image), max_hole_area=hole, max_sprinkle_area=sprinkle, **prompt, **kw
        )
        np.testing.assert_array_equal(filled[2], plain[2])  # low-res logits are returned unfilled
        assert not np.array_equal(filled[0], plain[0])  # ... but the masks changed
        pred = SAM2ImagePredictor(
            build_tiny(str(sam2_checkpoint)), max_hole_area=hole, max_sprinkle_area=sprinkle
        )
        s = pred.model.image_size
        pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        assert_same_answer(filled, direct(pred, image, **prompt))


def test_mask_threshold_equals_the_library_predictors(kw, sam2_checkpoint):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = scene(seed=4)
    prompt = {"point_coords": [[50, 40]], "point_labels": [1]}
    got = sc.generate_sam2_prompt_masks(image=encode_image(image), mask_threshold=1.5, **prompt, **kw)
    pred = SAM2ImagePredictor(build_tiny(str(sam2_checkpoint)), mask_threshold=1.5)
    s = pred.model.image_size
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    assert_same_answer(got, direct(pred, image, **prompt))
    default = sc.generate_sam2_prompt_masks(image=encode_image(image), **prompt, **kw)
    assert default[0].sum() > got[0].sum()  # a higher threshold keeps fewer pixels


def test_second_prompt_on_an_image_skips_the_encoder(sam2_server, kw):
    image = encode_image(scene(seed=7))
    before = info(sam2_server)
    sc.generate_sam2_prompt_masks(image=image, **PROMPTS["one point"], **kw)
    mid = info(sam2_server)
    sc.generate_sam2_prompt_masks(image=image, **PROMPTS["box"], **kw)
    after = info(sam2_server)
    model = "sam2.1_hiera_t"
    assert mid["encoded_images"][model] == before["encoded_images"][model] + 1
    assert mid["embedding_cache"][model]["misses"] == before["embedding_cache"][model]["misses"] + 1
    assert after["encoded_images"][model] == mid["encoded_images"][model]  # encoder not called
    assert after["embedding_cache"][model]["hits"] == mid["embedding_cache"][model]["hits"] + 1
    assert after["embedding_cache"][model]["misses"] == mid["embedding_cache"][model]["misses"]
    assert after["embedding_cache"][model]["capacity"] == 4


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, sam2_checkpoint):
    """Two SAM 2 workers on one device, no key: which worker an image and its id go to."""
    model = {"name": "sam2.1_hiera_t", "weights": str(sam2_checkpoint), "arch_config": str(ARCH)}
    config = {"sam2": {"max_batch_size": 8, "cache_size": 16, "models": [model]}}
    args = ["--no-auth", "--workers-per-device", "2"]
    server = ServerProcess(config, tmp_path_factory.mktemp("sam2-two"), args)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def worker_counts(server) -> list[tuple[int, int, int, int]]:
    """Per worker: images encoded, prompt_mask answered, embed answered, prompt_mask refused."""
    workers = requests.get(server.url + "/info").json()["families"]["sam2"]["workers"]
    assert len(workers) == 2
    out = []
    for w in workers:
        prompt, embed = w["requests"].get("prompt_mask", {}), w["requests"].get("embed", {})
        out.append(
            (
                w["encoded_images"].get("sam2.1_hiera_t", 0),
                prompt.get("ok", 0),
                embed.get("ok", 0),
                prompt.get("client_error", 0),
            )
        )
    return out


def grew(before: list[tuple], after: list[tuple]) -> list[tuple[int, ...]]:
    return [tuple(a - b for a, b in zip(wa, wb, strict=True)) for wa, wb in zip(after, before, strict=True)]


def test_with_two_workers_each_image_is_encoded_once(two_workers, reference):
    """Five users clicking on their own image at once: every prompt on an image goes to the worker
    that encoded it (least busy first), so five encoder runs in all, on both workers."""
    url = two_workers.url + "/sam2"
    before = worker_counts(two_workers)
    images = [scene(seed=200 + i) for i in range(5)]

    def user(i: int):
        think = random.Random(i)
        for k in range(6):
            time.sleep(think.uniform(0, 0.03))
            got = sc.generate_sam2_prompt_masks(image=encode_image(images[i]), base_url=url, **click(k))
        return got

    def click(k: int) -> dict:
        return {"point_coords": [[20 + 5 * k, 30]], "point_labels": [1]}

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(user, range(5)))
    for image, got in zip(images, answers, strict=True):
        assert_same_answer(got, direct(reference, image, **click(5)))
    diff = grew(before, worker_counts(two_workers))
    assert sum(d[0] for d in diff) == 5
    assert all(d[1] > 0 for d in diff)


def test_an_image_and_its_id_go_to_the_same_of_two_workers(two_workers, reference):
    """``/sam2/embed`` on four images at once, then clicks on each id and one with the image
    itself: each image is encoded once, and no click finds its id missing on its worker."""
    url = {"base_url": two_workers.url + "/sam2"}
    before = worker_counts(two_workers)
    images = [scene(seed=300 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        ids = [r["image_id"] for r in pool.map(lambda im: sc.embed_sam2_image(im, **url), images)]

    def user(i: int):
        answers = []
        for k in range(5):  # clicks on the id, and one with the image itself, all on one worker
            click = {"point_coords": [[10 + 8 * k, 30]], "point_labels": [1]}
            if k == 2:
                answers.append(sc.sam2_point_mask(images[i], **click, **url))
            else:
                answers.append(sc.generate_sam2_prompt_masks(image_id=ids[i], **click, **url))
        return answers

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(user, range(4)))
    for image, got in zip(images, answers, strict=True):
        assert_same_answer(got[-1], direct(reference, image, point_coords=[[42, 30]], point_labels=[1]))
    diff = grew(before, worker_counts(two_workers))
    assert sum(d[0] for d in diff) == 4  # each image once
    assert all(d[2] > 0 for d in diff)  # and both workers had some embeds
    assert all(d[3] == 0 for d in diff)  # never "not cached"


def test_concurrent_prompts_on_new_images_share_one_encoder_pass(sam2_server, reference, kw):
    """Six new images at once: the image encoder runs on each exactly once, and on several of
    them in one forward (its calls counted by batch size, before and after)."""
    images = [scene(seed=100 + i) for i in range(6)]
    before = info(sam2_server)["encoder_batch_sizes"]["sam2.1_hiera_t"]
    with ThreadPoolExecutor(6) as pool:
        outs = list(
            pool.map(
                lambda im: sc.generate_sam2_prompt_masks(
                    image=encode_image(im), **PROMPTS["one point"], **kw
                ),
                images,
            )
        )
    for im, out in list(zip(images, outs, strict=True))[:2]:
        assert_same_answer(out, direct(reference, im, **PROMPTS["one point"]))
    after = info(sam2_server)["encoder_batch_sizes"]["sam2.1_hiera_t"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == len(images) and max(new) > 1, new


def test_model_spellings_select_configured_models_only(sam2_server, kw):
    image = encode_image(scene())
    answers = set()
    for spelling in [
        {"model_cfg": "configs/sam2.1/sam2.1_hiera_t.yaml"},
        {"checkpoint_path": "./checkpoints/sam2.1_hiera_tiny.pt"},
        {"model_cfg": "facebook/sam2.1-hiera-tiny", "checkpoint_path": "sam2.1_hiera_t.pt"},
        {},
    ]:
        body = {"image": image, **PROMPTS["one point"], **spelling}
        r = post("sam2", "prompt_mask", body, **kw)
        assert r["model"] == "sam2.1_hiera_t"
        answers.add(r["low_res_masks"])
    assert len(answers) == 1
    other = post(
        "sam2",
        "prompt_mask",
        {"image": image, **PROMPTS["one point"], "model_cfg": "sam2_hiera_t.yaml"},
        **kw,
    )
    assert other["model"] == "sam2_hiera_t" and other["low_res_masks"] not in answers
    assert info(sam2_server)["models_loaded"] == ["sam2.1_hiera_t", "sam2_hiera_t"]


# ----------------------------------------------------------------------------- auto_mask

LOOSE = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}  # random weights: keep what comes


def check_mask(m: dict, mask: np.ndarray) -> None:
    assert mask.shape == (72, 96) and mask.dtype == bool
    assert m["area"] == int(mask.sum())
    if m["area"]:
        ys, xs = np.nonzero(mask)
        assert m["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    assert len(m["point_coords"]) == 1 and len(m["crop_box"]) == 4
    assert 0 <= m["stability_score"] <= 1


@pytest.mark.parametrize("preset", ["coarse", "fine_grained"])
@pytest.mark.parametrize("output_mode", ["binary_mask", "uncompressed_rle", "coco_rle"])
def test_auto_masks_for_each_preset_and_output_mode(kw, preset, output_mode):
    extra = {"points_per_side": 8} if preset == "fine_grained" else {}  # its 64x64 grid is slow on CPU
    r = sc.generate_sam2_auto_masks(
        image=encode_image(scene()), preset=preset, output_mode=output_mode, **LOOSE, **extra, **kw
    )
    assert r["num_masks"] == len(r["masks"]) > 0 and r["image_size"] == [72, 96]
    want_settings = {
        "coarse": {"points_per_side": 16, "crop_n_layers": 0, "min_mask_region_area": 100, "use_m2m": False},
        "fine_grained": {
            "points_per_side": 8,
            "crop_n_layers": 1,
            "min_mask_region_area": 25,
            "use_m2m": True,
        },
    }[preset]
    assert r["settings"] | want_settings == r["settings"] and r["settings"]["pred_iou_thresh"] == 0.0
    for m in r["masks"]:
        if output_mode == "coco_rle":
            rle = {"size": m["segmentation"]["size"], "counts": m["segmentation"]["counts"].encode()}
            mask = coco_mask.decode(rle).astype(bool)
            assert int(coco_mask.area(rle)) == m["area"]
        else:
            mask = sc.decode_segmentation(m)
        check_mask(m, mask)


def test_compact_binary_encodings_decode_to_the_same_masks(kw):
    image = encode_image(scene())
    runs = {
        enc: sc.generate_sam2_auto_masks(image=image, preset="coarse", mask_encoding=enc, **LOOSE, **kw)
        for enc in ("float32", "packbits", "png")
    }
    ref = [sc.decode_segmentation(m) for m in runs["float32"]["masks"]]
    for enc in ("packbits", "png"):
        assert runs[enc]["mask_encoding"] == enc
        assert [m["area"] for m in runs[enc]["masks"]] == [m["area"] for m in runs["float32"]["masks"]]
        for m, want in zip(runs[enc]["masks"], ref, strict=True):
            np.testing.assert_array_equal(sc.decode_segmentation(m), want)
    sizes = {enc: len(json.dumps(r["masks"])) for enc, r in runs.items()}
    assert sizes["packbits"] * 10 < sizes["float32"]


def test_presets_without_overrides_are_the_spec_values(kw):
    r = sc.generate_sam2_auto_masks(image=encode_image(scene()), preset="coarse", **kw)
    assert r["settings"] == {
        "preset": "coarse",
        "points_per_side": 16,
        "points_per_batch": 64,
        "pred_iou_thresh": 0.8,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "crop_n_layers": 0,
        "crop_n_points_downscale_factor": 1,
        "min_mask_region_area": 100,
        "use_m2m": False,
        "mask_threshold": 0.0,
        "box_nms_thresh": 0.7,
        "crop_nms_thresh": 0.7,
        "crop_overlap_ratio": 512 / 1500,
        "multimask_output": True,
        "point_grids": False,
    }


def kernel_on_cpu(mask: torch.Tensor):
    """What sam2's CUDA connected-components kernel returns, one OpenCV call per mask."""
    labels, areas = [], []
    for m in mask[:, 0].to(torch.uint8).numpy():
        _, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        labels.append(lab)
        areas.append(np.where(lab > 0, stats[lab, cv2.CC_STAT_AREA], 0))
    return torch.from_numpy(np.stack(labels)[:, None]), torch.from_numpy(np.stack(areas)[:, None])


def test_min_mask_region_area_works_as_with_sam2s_kernel(kw, sam2_checkpoint, monkeypatch):
    """sam2 1.1.0 applies min_mask_region_area as hole/sprinkle filling of each mask's low-res
    logits (its CUDA kernel); the server must give what the library gives with that kernel."""
    import sam2.utils.misc
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", kernel_on_cpu)
    model = build_tiny(str(sam2_checkpoint))
    image = scene(seed=2)
    areas = {}
    for area in (0, 30):
        r = sc.generate_sam2_auto_masks(
            image=encode_image(image),
            preset="coarse",
            points_per_side=8,
            min_mask_region_area=area,
            box_nms_thresh=1.0,  # keep every mask: compare them all
            mask_encoding="packbits",
            **LOOSE,
            **kw,
        )
        settings = {k: v for k, v in r["settings"].items() if k not in ("preset", "point_grids")}
        amg = SAM2AutomaticMaskGenerator(model, **settings)
        s = model.image_size
        amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        want = amg.generate(image)
        assert r["num_masks"] == len(want) > 1
        for m, w in zip(r["masks"], want, strict=True):
            assert np.mean(sc.decode_segmentation(m) != w["segmentation"]) < 1e-3
            assert m["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-4)
        areas[area] = sorted(m["area"] for m in r["masks"])
    assert areas[0] != areas[30]


#: The presets as the README states them (not read from the server): what the library gets.
PRESET_VALUES = {
    "coarse": {
        "points_per_side": 16,
        "points_per_batch": 64,
        "pred_iou_thresh": 0.8,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "crop_n_layers": 0,
        "crop_n_points_downscale_factor": 1,
        "min_mask_region_area": 100,
        "use_m2m": False,
    },
    "fine_grained": {
        "points_per_side": 64,
        "points_per_batch": 128,
        "pred_iou_thresh": 0.7,
        "stability_score_thresh": 0.92,
        "stability_score_offset": 0.7,
        "crop_n_layers": 1,
        "crop_n_points_downscale_factor": 2,
        "min_mask_region_area": 25,
        "use_m2m": True,
    },
}
COMMON_VALUES = {
    "mask_threshold": 0.0,
    "box_nms_thresh": 0.7,
    "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500,
    "multimask_output": True,
}
GRID = [[x, y] for x in (0.2, 0.5, 0.8) for y in (0.3, 0.7)]
AUTO_CASES = {
    "coarse defaults, small grid": ("coarse", {"points_per_side": 8}, "binary_mask"),
    "fine_grained defaults, small grid": ("fine_grained", {"points_per_side": 2}, "binary_mask"),
    "coarse, default NMS": ("coarse", {"points_per_side": 8, **LOOSE}, "uncompressed_rle"),
    "fine_grained crops and m2m": ("fine_grained", {"points_per_side": 4, **LOOSE}, "coco_rle"),
    "coarse point_grids": ("coarse", {"point_grids": [GRID], **LOOSE}, "binary_mask"),
    "thresholds and offsets": (
        "coarse",
        {"points_per_side": 6, "pred_iou_thresh": 0.5, "stability_score_offset": 0.5, "mask_threshold": 0.3}
        | {"stability_score_thresh": 0.2, "box_nms_thresh": 0.5, "multimask_output": False},
        "coco_rle",
    ),
    # predicted IoUs of this model lie within 0.52-0.54 here, stability scores within 0.005-0.05:
    # these keep some masks and drop others (checked against the library with both thresholds at 0)
    "thresholds that split the masks": (
        "coarse",
        {"points_per_side": 6, "pred_iou_thresh": 0.535, "stability_score_offset": 0.5, "mask_threshold": 0.3}
        | {"stability_score_thresh": 0.015, "box_nms_thresh": 1.0, "multimask_output": False},
        "binary_mask",
    ),
}
SPLITTING = {"thresholds that split the masks"}


@pytest.mark.parametrize("case", AUTO_CASES)
def test_auto_mask_equals_the_library_generator_field_by_field(kw, sam2_checkpoint, monkeypatch, case):
    """Every output field against ``SAM2AutomaticMaskGenerator`` given the documented preset
    values plus the request's overrides, in the same output mode."""
    import sam2.utils.misc
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    preset, overrides, mode = AUTO_CASES[case]
    image = scene(seed=2)
    r = sc.generate_sam2_auto_masks(
        image=encode_image(image), preset=preset, output_mode=mode, **overrides, **kw
    )
    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", kernel_on_cpu)
    settings = {**PRESET_VALUES[preset], **COMMON_VALUES, **overrides}
    if "point_grids" in overrides:
        settings["points_per_side"] = None
        settings["point_grids"] = [np.array(g) for g in overrides["point_grids"]]
    model = build_tiny(str(sam2_checkpoint))
    amg = SAM2AutomaticMaskGenerator(model, output_mode=mode, **settings)
    s = model.image_size
    amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    try:
        want = amg.generate(image)
    except IndexError:  # sam2 1.1.0 fails on crops when no mask is kept anywhere
        want = []
    assert r["num_masks"] == len(want), (r["num_masks"], len(want))
    if overrides.get("pred_iou_thresh") == 0.0:
        assert want, "a case meant to keep masks kept none"
    if case in SPLITTING:
        amg.pred_iou_thresh = amg.stability_score_thresh = 0.0
        assert 0 < len(want) < len(amg.generate(image)), "the thresholds must keep some masks, not all"
    for m, w in zip(r["masks"], want, strict=True):
        assert m["area"] == w["area"]
        np.testing.assert_allclose(m["bbox"], w["bbox"], atol=1e-6)
        assert m["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-4)
        assert m["stability_score"] == pytest.approx(w["stability_score"], abs=1e-4)
        np.testing.assert_allclose(m["point_coords"], w["point_coords"], atol=1e-4)
        assert m["crop_box"] == w["crop_box"]
        if mode == "binary_mask":
            np.testing.assert_array_equal(sc.decode_segmentation(m), w["segmentation"])
        else:
            assert m["segmentation"] == w["segmentation"]


#: one crop layer whose crops keep masks: no box or area filter, and a mask threshold that
#: leaves crop masks off the crop edges (random weights fill a crop otherwise)
CROPS = {"crop_n_layers": 1, "points_per_side": 2, "crop_n_points_downscale_factor": 1}
CROPS |= {"box_nms_thresh": 1.0, "min_mask_region_area": 0, **LOOSE}
CROP_VALUES = {
    # 1.0 keeps the 12 masks of the full-image layer that the default 0.7 merges into one
    "crop_nms_thresh": ({}, [1.0, 0.3]),
    # the crops' boxes follow the overlap
    "crop_overlap_ratio": ({"crop_nms_thresh": 1.0, "mask_threshold": 1.0}, [0.1, 0.6]),
}


@pytest.mark.parametrize("field", CROP_VALUES)
def test_crop_nms_and_overlap_equal_the_library_generator_at_two_values(
    kw, sam2_checkpoint, monkeypatch, field
):
    """Each value against SAM2AutomaticMaskGenerator given it; the two values' answers differ, so
    a field the server ignores (or always sets to its default) fails one of them."""
    import sam2.utils.misc
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", kernel_on_cpu)
    image = scene(seed=2)
    model = build_tiny(str(sam2_checkpoint))
    extra, values = CROP_VALUES[field]
    answers = []
    for value in values:
        over = {**CROPS, **extra, field: value}
        r = sc.generate_sam2_auto_masks(
            image=encode_image(image), preset="coarse", output_mode="coco_rle", **over, **kw
        )
        amg = SAM2AutomaticMaskGenerator(
            model, output_mode="coco_rle", **{**PRESET_VALUES["coarse"], **COMMON_VALUES, **over}
        )
        s = model.image_size
        amg.predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        want = amg.generate(image)
        got = [(m["area"], m["crop_box"], m["segmentation"]) for m in r["masks"]]
        assert got == [(w["area"], w["crop_box"], w["segmentation"]) for w in want], (field, value)
        answers.append(got)
    assert answers[0] != answers[1], f"{field}: the two values must give different answers here"


def test_request_defaults_reach_the_generator_as_documented(sam2_checkpoint, monkeypatch):
    """What the server hands ``SAM2AutomaticMaskGenerator`` for a request that names nothing
    (preset ``fine_grained``) or only the preset: the README's values, and where the README
    says nothing else, the library's own defaults. Read at the generator's constructor, so a
    default that is reported right but applied wrong fails too."""
    import inspect

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from apis.sam2 import model as sam2_model
    from apis.sam2.schemas import Sam2AutoMaskRequest, generator_settings

    library = {
        k: p.default
        for k, p in inspect.signature(SAM2AutomaticMaskGenerator.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert {k: library[k] for k in COMMON_VALUES} == COMMON_VALUES
    assert {
        k: library[k] for k in PRESET_VALUES["coarse"] if k not in ("points_per_side", "min_mask_region_area")
    } == {
        k: v
        for k, v in PRESET_VALUES["coarse"].items()
        if k not in ("points_per_side", "min_mask_region_area")
    }
    seen = []
    real_init = SAM2AutomaticMaskGenerator.__init__

    def spy(self, model, **kwargs):
        seen.append(kwargs)
        real_init(self, model, **kwargs)

    monkeypatch.setattr(SAM2AutomaticMaskGenerator, "__init__", spy)
    monkeypatch.setattr(SAM2AutomaticMaskGenerator, "generate", lambda self, image: [])
    pred = sam2_model.Sam2Predictor(build_tiny(str(sam2_checkpoint)), cache_size=1)
    image = encode_image(scene())
    for body, preset in (({}, "fine_grained"), ({"preset": "coarse"}, "coarse")):
        settings = generator_settings(Sam2AutoMaskRequest(image=image, **body))
        sam2_model.auto_masks(pred, "k", scene(), settings, "binary_mask")
        want = {**PRESET_VALUES[preset], **COMMON_VALUES, "point_grids": None, "output_mode": "binary_mask"}
        assert seen.pop() == want


def test_point_grids_replace_points_per_side(kw):
    grid = [[x, y] for x in (0.25, 0.75) for y in (0.25, 0.75)]
    r = sc.generate_sam2_auto_masks(
        image=encode_image(scene()), preset="coarse", point_grids=[grid], **LOOSE, **kw
    )
    assert r["settings"]["point_grids"] is True and r["settings"]["points_per_side"] is None
    assert 0 < r["num_masks"] <= 4 * 3
    seeds = {tuple(m["point_coords"][0]) for m in r["masks"]}
    assert seeds <= {(24.0, 18.0), (24.0, 54.0), (72.0, 18.0), (72.0, 54.0)}


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("prompt_mask", {"point_coords": [[30, 20]], "point_labels": [1, 0]}, 422, "2 labels for 1 points"),
        ("prompt_mask", {"point_coords": [[30, 20, 1]], "point_labels": [1]}, 422, "[x, y] pairs"),
        ("prompt_mask", {"point_coords": [[30, 20]], "point_labels": [2]}, 422, "1 (foreground) or 0"),
        ("prompt_mask", {"point_coords": [[30, 20]]}, 422, "point_labels go together"),
        ("prompt_mask", {"box": [1, 2, 3]}, 422, "box must be [x1, y1, x2, y2] (4 numbers), got 3"),
        ("prompt_mask", {"box": [50, 10, 20, 40]}, 422, "x1 <= x2"),
        ("prompt_mask", {"box": [10, 10, 200, 40]}, 400, "outside the 96x72 image"),
        (
            "prompt_mask",
            {"point_coords": [[97, 20]], "point_labels": [1]},
            400,
            "point [97.0, 20.0] is outside",
        ),
        (
            "prompt_mask",
            {"point_coords": [[0.5, 1.5]], "point_labels": [1], "normalize_coords": False},
            400,
            "normalised [0, 1] units",
        ),
        ("prompt_mask", {}, 422, "give at least one prompt"),
        ("prompt_mask", {"mask_input": "AAAA"}, 422, "mask_input_shape go together"),
        ("prompt_mask", {"mask_input": "AAAA", "mask_input_shape": [1, 64, 64]}, 422, "needs 16384"),
        ("prompt_mask", {"mask_input": "@@@", "mask_input_shape": [1, 1, 1]}, 422, "not valid base64"),
        ("prompt_mask", {"mask_input_shape": [1, 256, 256], "mask_input": "full"}, 400, "takes [1, 64, 64]"),
        (
            "prompt_mask",
            {"box": [1, 1, 5, 5], "model_cfg": "sam2.1_hiera_l.yaml"},
            400,
            "offers: sam2.1_hiera_t",
        ),
        (
            "prompt_mask",
            {
                "box": [1, 1, 5, 5],
                "model_cfg": "sam2.1_hiera_t.yaml",
                "checkpoint_path": "sam2_hiera_tiny.pt",
            },
            400,
            "model_cfg names sam2.1_hiera_t but checkpoint_path names sam2_hiera_t",
        ),
        ("auto_mask", {"preset": "medium"}, 422, "preset"),
        ("auto_mask", {"output_mode": "polygons"}, 422, "output_mode"),
        ("auto_mask", {"points_per_side": 0}, 422, "points_per_side"),
        ("auto_mask", {"point_grids": [[[0.5, 1.5]]]}, 422, "within [0, 1]"),
        (
            "auto_mask",
            {"point_grids": [[[0.5, 0.5]]], "preset": "fine_grained"},
            422,
            "crop_n_layers=1 needs 2",
        ),
    ],
)
def test_bad_inputs_get_a_clear_4xx(kw, route, body, status, needle):
    image = scene()
    if body.get("mask_input") == "full":
        body = {**body, "mask_input": sc.encode_mask_input(np.zeros((1, 256, 256), np.float32))[0]}
    with pytest.raises(VisionServeError) as err:
        post("sam2", route, {"image": encode_image(image), **body}, **kw)
    assert err.value.status == status, err.value.message
    assert needle in err.value.message
    ok = sc.generate_sam2_prompt_masks(image=encode_image(image), **PROMPTS["box"], **kw)  # still serving
    assert ok[0].shape == (3, 72, 96)


def test_too_many_float32_masks_are_refused_with_advice(kw):
    big = np.repeat(np.repeat(scene(), 4, axis=0), 4, axis=1)  # 288x384
    with pytest.raises(VisionServeError) as err:
        sc.generate_sam2_auto_masks(image=encode_image(big), preset="coarse", **LOOSE, **kw)
    assert err.value.status == 400 and err.value.code == "response_too_large"
    assert "mask_encoding=packbits" in err.value.message
    r = sc.generate_sam2_auto_masks(
        image=encode_image(big), preset="coarse", mask_encoding="packbits", **LOOSE, **kw
    )
    assert r["num_masks"] > 0


def test_overlay_of_a_phone_jpeg_is_turned_like_the_servers_masks(kw, tmp_path):
    """EXIF orientation 6 (turn 90 degrees clockwise to display): the server decodes the file
    turned, so its masks are 96 high and 72 wide, and the overlay of the file must fit them."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "phone.jpg"
    Image.fromarray(scene()).save(photo, format="JPEG", quality=95, exif=exif.tobytes())
    masks, _, _ = sc.sam2_point_mask(str(photo), point_coords=[[30, 60]], point_labels=[1], **kw)
    assert masks.shape == (3, 96, 72)
    out = sc.save_mask_overlay(str(photo), masks[:1], tmp_path / "overlay.png", alpha=1.0, seed=4)
    got = np.asarray(Image.open(out))
    turned = np.rot90(np.asarray(Image.open(photo).convert("RGB")), k=-1)  # clockwise
    colour = np.random.default_rng(4).integers(40, 256, size=(1, 3))[0]
    m = masks[0] > 0.5
    assert 0 < m.sum() < m.size
    np.testing.assert_array_equal(got[~m], turned[~m])
    np.testing.assert_array_equal(got[m], np.broadcast_to(colour, got[m].shape))


@pytest.mark.parametrize("cache_size, encodings", [(0, 4), (2, 2)])
def test_embeddings_batch_new_images_and_cache_size_0_keeps_none(sam2_checkpoint, cache_size, encodings):
    """Two new images: one image-encoder forward of 2; the same two again are cache hits, unless
    cache_size is 0, which encodes them again."""
    from apis.sam2 import model as sam2_model

    pred = sam2_model.Sam2Predictor(build_tiny(str(sam2_checkpoint)), cache_size=cache_size)
    images = [scene(seed=400), scene(seed=401)]
    first = pred.embeddings(["a", "b"], images)
    assert dict(pred.encoder_batches) == {2: 1}
    again = pred.embeddings(["a", "b"], images)
    assert pred.encoded_images == encodings
    assert dict(pred.encoder_batches) == ({2: 2} if cache_size == 0 else {2: 1})
    assert (again[0] is first[0]) is (cache_size > 0)
