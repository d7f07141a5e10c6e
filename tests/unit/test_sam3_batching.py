"""SAM 3 find-queries batched into one detector forward give what sam3's own ``Sam3Processor``
gives one prompt at a time: text prompts, exemplar boxes (positive and negative), and both, on
two cached images at once, at several chunk sizes. In-process, on the tiny model of
``tests/http/test_sam3_http.py`` (scores spread around 0.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sam3.model.sam3_image_processor import Sam3Processor

from apis.sam3.model import Query, Sam3Arch, Sam3Runner, instance_mask, normalized_cxcywh
from tests.http.test_sam3_http import ARCH, scene, tiny_model

IMAGES = [scene(seed=0), scene(h=50, w=70, seed=1)]
# (image, text, boxes [x1, y1, x2, y2] px, labels)
QUERIES = [
    (0, "a red car", [], []),
    (1, "tree", [], []),
    (0, None, [[3, 4, 30, 40]], [True]),
    (1, "the dog", [[3, 4, 30, 40], [10.5, 10, 60, 45]], [True, False]),
    (0, "tree", [], []),
    (1, None, [[0, 0, 70, 50], [20, 5, 40, 25], [50, 30, 69, 49]], [True, True, False]),
    (0, "a red car", [[5, 10, 40, 55]], [False]),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def one_at_a_time(model, image: np.ndarray, text: str | None, boxes, labels) -> dict[str, torch.Tensor]:
    """Sam3Processor's answer with every query kept: its text prompt, then each box added."""
    proc = Sam3Processor(model, resolution=224, device="cpu", confidence_threshold=0.0)
    h, w = image.shape[:2]
    state = proc.set_image(Image.fromarray(image))
    if text is not None:
        state = proc.set_text_prompt(text, state)
    for box, label in zip(boxes, labels, strict=True):
        state = proc.add_geometric_prompt(normalized_cxcywh(box, w, h), label, state)
    return {"scores": state["scores"], "boxes": state["boxes"], "masks": state["masks"][:, 0]}


@pytest.fixture(scope="module")
def references(model):
    return [one_at_a_time(model, IMAGES[i], text, boxes, labels) for i, text, boxes, labels in QUERIES]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16])
def test_batched_queries_equal_the_processor_one_prompt_at_a_time(model, references, chunk):
    runner = Sam3Runner(model, Sam3Arch.from_json(ARCH), torch.device("cpu"), torch.float32, cache_size=4)
    encs = runner.encode([str(i) for i in range(len(IMAGES))], IMAGES)
    queries = [Query(encs[i], text, boxes, labels) for i, text, boxes, labels in QUERIES]
    dets = runner.detect(queries, chunk)
    assert sum(runner.detector_batches.values()) == -(-len(QUERIES) // chunk)  # forwards of <= chunk
    assert max(runner.detector_batches) == min(chunk, len(QUERIES))
    for q, det, want in zip(queries, dets, references, strict=True):
        assert len(det.scores) == len(want["scores"]) == 20  # threshold 0 keeps every query
        assert (det.scores - want["scores"]).abs().max() <= 1e-5
        h, w = q.enc.height, q.enc.width
        for k in range(len(det.scores)):
            np.testing.assert_array_equal(instance_mask(det.mask_logits[k], h, w), want["masks"][k].numpy())
    # the boxes change the answer, so the comparison above covers them
    assert (references[0]["scores"] - references[6]["scores"]).abs().max() > 1e-3


def test_new_prompts_are_text_encoded_as_one_batch(model):
    runner = Sam3Runner(model, Sam3Arch.from_json(ARCH), torch.device("cpu"), torch.float32, cache_size=4)
    enc = runner.encode(["0"], IMAGES[:1])[0]
    runner.detect([Query(enc, t) for t in ["cat", "dog", "cat", "bird"]], chunk=8)
    assert runner.encoded_prompts == 3 and dict(runner.text_batches) == {3: 1}
    runner.detect(
        [Query(enc, t) for t in ["dog", "horse", "cow"]] + [Query(enc, None, [[1, 1, 9, 9]], [True])], 8
    )
    assert runner.encoded_prompts == 6 and dict(runner.text_batches) == {3: 2}  # "visual" for the boxes


def test_a_score_threshold_drops_detections_as_they_are_made(model, references):
    runner = Sam3Runner(model, Sam3Arch.from_json(ARCH), torch.device("cpu"), torch.float32, cache_size=4)
    enc = runner.encode(["0"], IMAGES[:1])[0]
    det = runner.detect([Query(enc, "a red car", score_threshold=0.5)], chunk=1)[0]
    want = references[0]["scores"]
    assert 0 < len(det.scores) < len(want)
    assert det.scores.tolist() == pytest.approx(want[want > 0.5].tolist(), abs=1e-5)
    assert det.mask_logits.shape[0] == det.boxes.shape[0] == len(det.scores)


@pytest.mark.parametrize("cache_size, encodings", [(0, 6), (4, 3)])
def test_new_images_encode_in_one_trunk_forward_and_cache_size_0_keeps_none(model, cache_size, encodings):
    """Three new images: one image-encoder forward of 3 (counted at the trunk itself); the same
    three again are cache hits, unless cache_size is 0, which encodes them again."""
    runner = Sam3Runner(
        model, Sam3Arch.from_json(ARCH), torch.device("cpu"), torch.float32, cache_size=cache_size
    )
    keys, images = ["a", "b", "c"], [*IMAGES, scene(seed=9)]
    first = runner.encode(keys, images)
    assert dict(runner.encoder_batches) == {3: 1}
    again = runner.encode(keys, images)
    assert runner.encoded_images == encodings
    assert dict(runner.encoder_batches) == ({3: 2} if cache_size == 0 else {3: 1})
    assert (again[0] is first[0]) is (cache_size > 0)
