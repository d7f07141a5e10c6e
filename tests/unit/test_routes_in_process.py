"""Each family's routes through the in-process harness (tests/harness.py): configs/demo.yaml's
tiny models with their seeded random weights, the request validated and turned into a job as
the HTTP process does, then run as one worker batch; the answers compared with the library
itself on the model the worker loaded. The same answers over HTTP are checked in tests/http/."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clients.clip_client import decode_features, decode_text_embedding
from clients.common import decode_array, encode_image
from clients.sam2_client import decode_prompt_answer
from tests import harness


def scene(h: int = 45, w: int = 61, seed: int = 0) -> np.ndarray:
    """Blobs plus noise, neither side a multiple of a patch."""
    yy, xx = np.mgrid[:h, :w]
    base = (np.sin(xx / 7.0 + seed) + np.cos(yy / 5.0)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 25, (h, w, 3))
    return np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)


def test_clip_texts_of_one_batch_equal_open_clips_encode_text():
    api = harness.demo("clip")
    texts = ["a photo of a cat", "a dog", "an extremely long description of a small red bicycle"]
    replies = [harness.json_of(r) for r in harness.run(api, "encode_text", [{"text": t} for t in texts])]
    cm = harness.loaded(api)
    with torch.inference_mode():
        want = torch.nn.functional.normalize(cm.model.encode_text(cm.tokenizer(texts)), dim=-1).numpy()
    got = np.stack([decode_text_embedding(r["text_embedding"], r["shape"]) for r in replies])
    assert got.shape == (3, cm.embed_dim)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_clip_extract_answers_one_feature_per_patch_of_the_padded_image():
    api = harness.demo("clip")
    cm = harness.loaded(api)
    image = encode_image(scene())
    r = harness.call(api, "extract", {"image": image, "load_size": None, "ret_patches": True})
    p = cm.patch_size
    assert r["shape"] == [-(-45 // p), -(-61 // p), cm.embed_dim] and not r["is_pca"]
    assert np.isfinite(decode_features(r["features"], r["shape"])).all()
    pca = harness.call(api, "extract", {"image": image, "load_size": None, "ret_pca": True})
    assert pca["shape"][-1] == 3 and pca["is_pca"]


def test_dino_embed_equals_timms_forward_features_on_its_eval_transform():
    api = harness.demo("dino")
    dm = harness.loaded(api)
    images = [scene(seed=1), scene(30, 40, seed=2)]
    r = harness.call(api, "embed", {"images": [encode_image(i) for i in images]})
    got = decode_array(r["embeddings"], r["shape"])
    with torch.inference_mode():
        x = torch.stack([dm.preprocess(Image.fromarray(i)) for i in images])
        want = dm.model.forward_head(dm.model.forward_features(x), pre_logits=True).numpy()
    assert got.shape == (2, dm.embed_dim)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    "prompt",
    [
        {"point_coords": [[30, 20]], "point_labels": [1]},
        {"box": [10, 10, 50, 40], "point_coords": [[25, 25]], "point_labels": [1], "multimask_output": False},
    ],
)
def test_sam2_prompt_mask_equals_the_image_predictor(prompt):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    api = harness.demo("sam2")
    image = scene()
    got = decode_prompt_answer(harness.call(api, "prompt_mask", {"image": encode_image(image), **prompt}))
    sam2 = harness.loaded(api).model
    pred = SAM2ImagePredictor(sam2)
    s = sam2.image_size
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # a tiny model's
    pred.set_image(image)
    want = pred.predict(**{k: np.asarray(v) if isinstance(v, list) else v for k, v in prompt.items()})
    assert got[0].shape == want[0].shape and got[2].shape == want[2].shape
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-4)
    assert np.mean(got[0] != want[0]) < 1e-3  # a pixel exactly at the threshold may round either way


def test_sam3_predict_equals_sam3_processor_on_the_same_model():
    from sam3.model.sam3_image_processor import Sam3Processor

    api = harness.demo("sam3")
    image = scene(61, 45, seed=3)
    body = {"image": encode_image(image), "prompts": ["a cat"], "score_threshold": 0.0, "min_area": 0}
    got = harness.call(api, "predict", {**body, "return_masks": True})["results"]
    runner = harness.loaded(api)
    processor = Sam3Processor(runner.model, resolution=runner.arch.resolution, device="cpu")
    processor.confidence_threshold = 0.0
    state = processor.set_text_prompt("a cat", processor.set_image(Image.fromarray(image)))
    order = torch.argsort(state["scores"], descending=True, stable=True)
    masks = state["masks"][:, 0].numpy()
    want = [(float(state["scores"][i]), masks[i]) for i in order.tolist() if masks[i].any()]  # empty: dropped
    assert len(got) == len(want) > 0
    for g, (score, mask) in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(score, abs=1e-5)
        assert g["area"] == int(mask.sum())


@pytest.mark.parametrize(
    "settings",
    [
        {"prompt_threads": 1, "parallel_prompts": 3, "trace_decoder": False},
        {"prompt_threads": 2, "parallel_prompts": 0, "trace_decoder": True},
    ],
)
def test_sam2_decoder_settings_reach_the_workers_predictor(settings):
    """sam2.prompt_threads, parallel_prompts and trace_decoder, each at two values, from the
    family's config section to the predictor a worker loads; their effects are tested on the
    predictor itself (tests/unit/test_units.py, tests/http/test_sam2_http.py)."""
    pred = harness.loaded(harness.family("sam2", **settings))
    assert (pred.prompt_threads, pred.parallel_prompts, pred.trace_decoder) == tuple(settings.values())
