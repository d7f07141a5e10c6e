"""A route's ``encode`` renders an answer from what ``predict`` gave, without a model: these
call it directly on made-up outputs, with no worker and no weights."""

from __future__ import annotations

import numpy as np
import pybase64
import pytest
import torch
from pycocotools import mask as mask_utils

from apis.clip.api import ClassifyInput
from apis.clip.schemas import ClipClassifyRequest
from apis.config import load_config
from apis.families import FAMILIES
from apis.route import AnswerFormat, Job
from apis.sam2.api import PromptOutput
from apis.sam2.schemas import Sam2PromptRequest
from apis.vectors import OpenAIOptions, Vectors

CFG = load_config("configs/demo.yaml")


def api(family: str):
    return FAMILIES[family].api_class()(CFG)


def masks(c: int, h: int = 6, w: int = 5) -> np.ndarray:
    rng = np.random.default_rng(c)
    return rng.random((c, h, w)) > 0.5


@pytest.mark.parametrize("encoding", ["coco_rle", "packbits"])
def test_prompt_mask_encode_renders_masks_scores_and_optional_logits(encoding):
    route = api("sam2").handlers["prompt_mask"]
    got = masks(3)
    out = PromptOutput(got, np.array([0.1, 0.7, 0.2], np.float32), np.zeros((3, 4, 4), np.float32))
    request = Sam2PromptRequest(
        image_id="0" * 64, point_coords=[[1, 1]], point_labels=[1], mask_encoding=encoding
    )
    body = route.encode(Job("prompt_mask", "m", request), None, out)
    if encoding == "coco_rle":
        rles = [{"size": r["size"], "counts": r["counts"].encode()} for r in body["masks"]]
        assert np.array_equal(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool), got)
    else:
        bits = np.frombuffer(pybase64.b64decode(body["masks"]), np.uint8)
        assert np.array_equal(np.unpackbits(bits)[: got.size].reshape(got.shape).astype(bool), got)
    assert body["masks_shape"] == [3, 6, 5] and body["low_res_shape"] == [3, 4, 4]
    compact = request.model_copy(update={"return_low_res_masks": False})
    body = route.encode(Job("prompt_mask", "m", compact), None, out)
    assert body["low_res_masks"] is None and body["low_res_shape"] is None


def test_classify_encode_turns_logits_into_probabilities():
    route = api("clip").handlers["classify"]
    request = ClipClassifyRequest(image="x", labels=["cat", "dog", "car"], templates=["a {}", "the {}"])
    item = ClassifyInput(torch.zeros(3, 2, 2), ["p"] * 6, 3)
    logits = torch.tensor([2.0, 0.0, -1.0])
    body = route.encode(Job("classify", "m", request), item, (logits, 100.0))
    assert body["labels"] == ["cat", "dog", "car"] and body["templates"] == 2 and body["logit_scale"] == 100.0
    assert np.allclose(body["probabilities"], torch.softmax(logits, 0).tolist())


def test_embed_encode_answers_the_family_json_or_openai_list_in_input_order():
    route = api("clip").handlers["embed"]
    vectors = Vectors(torch.eye(2, 4), torch.ones(1, 4), image_tokens=50, text_tokens=[7])
    request = route.request(images=[], texts=["t"])
    own = route.encode(Job("embed", "m", request), None, vectors)
    assert own["image_shape"] == [2, 4] and own["text_shape"] == [1, 4]
    options = OpenAIOptions(("image", "text", "image"), "float", None)
    job = Job("embed", "m", request, answer_format=AnswerFormat.OPENAI_EMBEDDINGS, openai=options)
    listed = route.encode(job, None, vectors)
    assert [d["embedding"] for d in listed["data"]] == [[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]
    assert listed["usage"]["prompt_tokens"] == 2 * 50 + 7


def test_a_job_carries_openai_options_exactly_when_its_answer_is_openai_s_list():
    request = api("clip").handlers["embed"].request(images=[], texts=["t"])
    options = OpenAIOptions(("text",), "float", None)
    with pytest.raises(ValueError):
        Job("embed", "m", request, openai=options)
    with pytest.raises(ValueError):
        Job("embed", "m", request, answer_format=AnswerFormat.OPENAI_EMBEDDINGS)
