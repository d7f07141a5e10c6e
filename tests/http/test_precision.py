"""``--dtype bfloat16`` / ``float16``: the autocast path of every torch family against float32.

One server at ``--dtype bfloat16`` (CLIP, DINO, SAM 2 and SAM 3) on the same tiny weights as
the float32 tests, compared over HTTP with the float32 references computed directly on the
libraries; float16 (one more server start saved) on the CLIP and DINO maths in-process, loaded
at that dtype as a worker loads them. Stated tolerances, as relative L2 error
``|got - want| / |want|``: 5% for bfloat16 (8 mantissa bits), 1% for float16 (11 bits). Each
answer must also be more than 1e-4 away (float32 rounding differences are about 1e-6), which
shows that the lower precision really ran.
RMBG runs on onnxruntime, which ``--dtype`` does not change.
"""

from __future__ import annotations

import numpy as np
import pytest

from clients import clip_client as cc
from clients import dino_client as dc
from clients import sam2_client as sc
from clients.common import encode_image
from clients.sam3_client import Sam3ServiceClient
from tests.conftest import CLIP_ARCH, KEYS, ServerProcess
from tests.http.test_clip_http import ref_model, reference_dense, reference_text  # noqa: F401 (fixture)
from tests.http.test_dino_http import dino_models, reference  # noqa: F401 (fixture)
from tests.http.test_sam2_http import ARCH as SAM2_ARCH
from tests.http.test_sam2_http import direct, sam2_checkpoint  # noqa: F401 (fixture)
from tests.http.test_sam2_http import reference as sam2_reference  # noqa: F401 (fixture)
from tests.http.test_sam2_http import scene as sam2_scene
from tests.http.test_sam3_http import ARCH as SAM3_ARCH
from tests.http.test_sam3_http import processor, raw_scores, sam3_checkpoint  # noqa: F401 (fixture)
from tests.http.test_sam3_http import scene as sam3_scene

TOLERANCE = {"bfloat16": 0.05, "float16": 0.01}


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    assert got.shape == want.shape
    err = rel_error(got.astype(np.float64), want.astype(np.float64))
    assert 1e-4 < err < TOLERANCE[dtype], err  # lower precision ran (float32 rounding is ~1e-6), close


@pytest.fixture(scope="module")
def low_server(tmp_path_factory, clip_checkpoint, dino_models, sam2_checkpoint, sam3_checkpoint):  # noqa: F811
    dtype = "bfloat16"
    _, dino_cfg, dino_weights = dino_models["dinov2_tiny14"]
    config = {
        "clip": {
            "models": [
                {
                    "name": "clip-tiny",
                    "pretrained": "testfile",
                    "weights": str(clip_checkpoint),
                    "arch_config": str(CLIP_ARCH),
                }
            ]
        },
        "dino": {
            "models": [{"name": "dinov2_tiny14", "weights": str(dino_weights), "arch_config": str(dino_cfg)}]
        },
        "sam2": {
            "models": [
                {"name": "sam2.1_hiera_t", "weights": str(sam2_checkpoint), "arch_config": str(SAM2_ARCH)}
            ]
        },
        "sam3": {
            "models": [{"name": "sam3-tiny", "weights": str(sam3_checkpoint), "arch_config": str(SAM3_ARCH)}]
        },
    }
    args = ["--api-key", KEYS[0], "--dtype", dtype]
    server = ServerProcess(config, tmp_path_factory.mktemp(f"{dtype}-server"), args)
    try:
        yield dtype, server.wait_ready(600)  # four families start on a loaded CI machine
    finally:
        server.stop()


def test_clip_features_and_text_within_tolerance(low_server, rgb_image, ref_model):  # noqa: F811
    dtype, server = low_server
    kw = {"base_url": server.url + "/clip", "api_key": KEYS[0]}
    got = cc.extract_clip_features_decoded(rgb_image, load_size=None, **kw)
    check(got, reference_dense(ref_model, rgb_image), dtype)
    text = cc.encode_clip_text_decoded("a photo of a robot arm", **kw)
    check(text, reference_text(ref_model, "a photo of a robot arm"), dtype)


def test_dino_features_within_tolerance(low_server, rgb_image, dino_models):  # noqa: F811
    dtype, server = low_server
    kw = {"base_url": server.url + "/dino", "api_key": KEYS[0], "model_type": "dinov2_tiny14"}
    for facet, stride in [("token", 14), ("key", 7)]:
        got = dc.extract_dino_features_decoded(rgb_image, facet=facet, stride=stride, **kw)
        check(got, reference(dino_models["dinov2_tiny14"][0], rgb_image, stride, facet, -1), dtype)


def test_sam2_logits_and_iou_within_tolerance(low_server, sam2_reference):  # noqa: F811
    dtype, server = low_server
    image = sam2_scene()
    prompt = {"point_coords": [[30, 20]], "point_labels": [1]}
    _, iou, low = sc.generate_sam2_prompt_masks(
        image=encode_image(image), base_url=server.url + "/sam2", api_key=KEYS[0], **prompt
    )
    _, want_iou, want_low = direct(sam2_reference, image, **prompt)
    check(low, want_low, dtype)
    check(iou, want_iou, dtype)


def test_sam3_scores_within_tolerance(low_server, processor):  # noqa: F811
    dtype, server = low_server
    image = sam3_scene(seed=1)
    client = Sam3ServiceClient(server.url + "/sam3", api_key=KEYS[0])
    got = client.predict(image=image, prompts=["tree"], score_threshold=0, min_area=0)["results"]
    want = np.sort(raw_scores(processor, image, "tree"))[::-1]
    scores = np.array([r["score"] for r in got])
    # empty masks drop out: compare the best scores, which carry the biggest masks
    check(scores[:5], want[:5], dtype)


def test_float16_clip_and_dino_within_tolerance(rgb_image, clip_checkpoint, ref_model, dino_models):  # noqa: F811
    import torch

    from apis.clip.model import dense_features as clip_dense
    from apis.clip.model import load_clip
    from apis.core.dense import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, preprocess
    from apis.core.settings import ModelEntry
    from apis.dino.model import dense_features as dino_dense
    from apis.dino.model import load_dino

    clip = ModelEntry(
        name="clip-tiny", pretrained="testfile", weights=str(clip_checkpoint), arch_config=CLIP_ARCH
    )
    cm = load_clip(clip, "cpu", torch.float16)
    x = preprocess(rgb_image, None, False, 14, "constant", CLIP_MEAN, CLIP_STD)
    check(clip_dense(cm, x)[0].numpy(), reference_dense(ref_model, rgb_image), "float16")
    model, cfg, weights = dino_models["dinov2_tiny14"]
    dm = load_dino(
        ModelEntry(name="dinov2_tiny14", weights=str(weights), arch_config=cfg), "cpu", torch.float16
    )
    x = preprocess(rgb_image, None, False, 14, "constant", IMAGENET_MEAN, IMAGENET_STD)
    for facet, stride in [("token", 14), ("key", 7)]:
        got = dino_dense(dm, x, stride, facet, -1)[0].numpy()
        check(got, reference(model, rgb_image, stride, facet, -1), "float16")
