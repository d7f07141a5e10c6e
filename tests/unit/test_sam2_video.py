"""SAM 2 video sessions in process, against sam2's ``SAM2VideoPredictor`` used the library's way.

The session runs on the family's one loaded model (``load_sam2``: the image routes' predictor
wraps it) from a checkpoint written here; the reference builds the library's video predictor
from the same file, opens the clip with ``init_state`` on a JPEG folder and calls
``add_new_points_or_box`` / ``add_new_mask`` / ``propagate_in_video``. The session gets the
pixels the library decodes from those JPEGs, so every frame's masks must be equal.
"""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pybase64
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from apis.core.errors import APIError
from apis.core.settings import ModelEntry
from apis.core.video import (
    FrameResult,
    TrackedObject,
    decode_video,
    encode_mask,
    frame_answer,
    read_video_file,
)
from tests.conftest import ROOT

ARCH = ROOT / "configs" / "models" / "sam2-tiny.json"
SPEC = json.loads(ARCH.read_text())
H, W = 72, 96


def clip(n: int, seed: int = 0) -> list[np.ndarray]:
    """A bright disc moving right over a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    background = (np.sin(xx / 6.0) + np.cos(yy / 4.0)) * 40 + 100
    out = []
    for t in range(n):
        disc = (xx - 20 - 3 * t) ** 2 + (yy - 36) ** 2 < 14**2
        img = background[..., None] + rng.normal(0, 10, (H, W, 3))
        img[disc] = (230, 60, 40)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two that wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    model = build_sam2_video_predictor(
        SPEC["config"], None, device="cpu", hydra_overrides_extra=SPEC["overrides"]
    )
    with torch.no_grad():  # objects "present" (object-score logit > 0): masks are not all empty
        model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(2.0)
    path = tmp_path_factory.mktemp("sam2-video") / "sam2-tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    """The model the sam2 family loads: the image predictor's ``model``, one module for both."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    from apis.sam2.model import load_sam2

    entry = ModelEntry(name="sam2.1_hiera_t", weights=str(checkpoint), arch_config=ARCH)
    model = load_sam2(entry, "cpu").model
    assert isinstance(model, SAM2VideoPredictor)
    return model


@pytest.fixture(scope="module")
def library(checkpoint):
    from sam2.build_sam import build_sam2_video_predictor

    return build_sam2_video_predictor(
        SPEC["config"], str(checkpoint), device="cpu", hydra_overrides_extra=SPEC["overrides"]
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> (JPEG folder for init_state, the frames decoded from it)."""
    out = {}
    for name, n in (("short", 6), ("long", 10)):
        folder = tmp_path_factory.mktemp(f"jpeg-{name}")
        frames = []
        for i, frame in enumerate(clip(n)):
            Image.fromarray(frame).save(folder / f"{i:05d}.jpg", quality=90)
            frames.append(np.asarray(Image.open(folder / f"{i:05d}.jpg").convert("RGB")))
        out[name] = (str(folder), frames)
    return out


def session(model, frames):
    from apis.sam2.video import VideoSession

    return VideoSession.open(model, frames)


def same(got: FrameResult, frame_idx: int, obj_ids: list, logits: torch.Tensor) -> None:
    assert got.frame_index == frame_idx
    assert [o.obj_id for o in got.objects] == list(obj_ids)
    for o, want in zip(got.objects, (logits[:, 0] > 0.0).numpy(), strict=True):
        assert o.mask.dtype == bool and o.mask.shape == (H, W)
        np.testing.assert_array_equal(o.mask, want)
        assert 0.0 <= o.score <= 1.0


def same_run(got: list[FrameResult], want: list) -> None:
    assert [r.frame_index for r in got] == [w[0] for w in want]
    for g, w in zip(got, want, strict=True):
        same(g, *w)
    assert any(o.mask.any() for r in got for o in r.objects)  # not all empty: something is compared


POINTS = {"points": [[30.0, 36.0], [70.0, 10.0]], "labels": [1, 0]}


@pytest.mark.parametrize(
    "kind, frame, prompt, runs",
    [
        ("points", 3, POINTS, [("both", None, None)]),
        ("box", 0, {"box": [5.0, 20.0, 40.0, 52.0]}, [("forward", None, None)]),
        ("mask", 2, "disc", [("forward", None, None), ("backward", 2, 2)]),
    ],
)
def test_every_frame_equals_the_library(model, library, videos, kind, frame, prompt, runs):
    folder, frames = videos["short"]
    if prompt == "disc":
        yy, xx = np.mgrid[:H, :W]
        prompt = {"mask": (xx - 26) ** 2 + (yy - 36) ** 2 < 13**2}
    state = library.init_state(folder)
    mine = session(model, frames)
    if kind == "mask":
        want = library.add_new_mask(state, frame, 1, prompt["mask"])
    else:
        want = library.add_new_points_or_box(state, frame, 1, **prompt)
    same(mine.add_prompt(frame, 1, **prompt), *want)
    for direction, start, max_frames in runs:
        got = list(mine.propagate(direction, start, max_frames))
        limit = None if max_frames is None else max_frames - 1
        want = []
        if direction in ("forward", "both"):
            want += list(library.propagate_in_video(state, start, limit, reverse=False))
        if direction in ("backward", "both"):
            back = list(library.propagate_in_video(state, start, limit, reverse=True))
            want += back[1:] if direction == "both" else back
        same_run(got, want)
    if runs[0][0] == "both":
        assert [r.frame_index for r in got] == [3, 4, 5, 2, 1, 0]


def test_more_clicks_and_an_object_added_after_tracking(model, library, videos):
    """clear_old_points=false adds clicks to the frame's; a second object prompted after a
    propagation is tracked with the first from then on (scores as the library's outputs)."""
    folder, frames = videos["short"]
    state = library.init_state(folder)
    mine = session(model, frames)
    steps = [
        (1, 1, {"points": [[30.0, 36.0]], "labels": [1]}),
        (1, 1, {"points": [[10.0, 10.0]], "labels": [0], "clear_old_points": False}),
    ]
    for frame, obj, prompt in steps:
        same(
            mine.add_prompt(frame, obj, **prompt), *library.add_new_points_or_box(state, frame, obj, **prompt)
        )
    same_run(list(mine.propagate()), list(library.propagate_in_video(state)))
    late = {"box": [30.0, 20.0, 70.0, 55.0]}
    same(mine.add_prompt(4, 7, **late), *library.add_new_points_or_box(state, 4, 7, **late))
    got = list(mine.propagate(start_frame_index=4))
    same_run(got, list(library.propagate_in_video(state, start_frame_idx=4)))
    assert {len(r.objects) for r in got} == {2}
    for r in got:
        for o in r.objects:
            idx = state["obj_id_to_idx"][o.obj_id]
            outputs = state["output_dict_per_obj"][idx]
            out = (
                outputs["cond_frame_outputs"].get(r.frame_index)
                or outputs["non_cond_frame_outputs"][r.frame_index]
            )
            assert o.score == pytest.approx(float(torch.sigmoid(out["object_score_logits"]).item()), abs=1e-6)
    # object 7 on frames 1-3, before its prompt: no object pointer to promote the bfloat16
    # memories, where the library fails on a float32 model
    assert [len(r.objects) for r in mine.propagate(max_frames=2)] == [2, 2]
    assert mine.describe()["objects"] == [1, 7]


def test_live_tracking_equals_offline_propagation_and_stays_flat(model, library, videos):
    """A live session fed the clip frame by frame (prompt on frame 0) answers what offline
    propagation answers for each frame, holds one frame's pixels and, once its memory window
    is full, the same number of bytes after every frame."""
    folder, frames = videos["long"]
    state = library.init_state(folder)
    want = [library.add_new_points_or_box(state, 0, 3, **POINTS)]
    want += list(library.propagate_in_video(state))[1:]
    mine = session(model, None)
    assert (mine.live, mine.num_frames) == (True, 0)
    assert mine.add_frame(frames[0]).objects == []
    got = [mine.add_prompt(0, 3, **POINTS)]
    sizes = []
    for frame in frames[1:]:
        got.append(mine.add_frame(frame))
        sizes.append(mine.describe()["memory_bytes"])
    same_run(got, want)
    info = mine.describe()
    assert (info["num_frames"], info["frames_held"], info["objects"]) == (10, 1, [3])
    assert (mine.width, mine.height) == (W, H)
    assert (
        len(mine.state["output_dict_per_obj"][0]["non_cond_frame_outputs"])
        == model.max_obj_ptrs_in_encoder - 1
    )
    assert sizes[-1] == sizes[-3] > 0  # frames 7 and 9: the window is full


def test_bad_prompts_and_frames_are_400(model, videos):
    _, frames = videos["short"]
    mine = session(model, frames[:3])
    cases = [
        ({"frame_index": 3, "points": [[1, 1]], "labels": [1]}, "out of range"),
        ({"frame_index": -1, "points": [[1, 1]], "labels": [1]}, "out of range"),
        ({"frame_index": 0, "points": [[1, 1]], "labels": [1, 0]}, "labels"),
        ({"frame_index": 0, "points": [[1, 1]], "labels": [2]}, "labels must be"),
        ({"frame_index": 0}, "give points"),
        ({"frame_index": 0, "box": [1, 2, 3]}, "box must be"),
        ({"frame_index": 0, "box": [1, 2, 3, 4], "clear_old_points": False}, "clear_old_points"),
        ({"frame_index": 0, "mask": np.ones((H, W + 1), bool)}, "video's size"),
        ({"frame_index": 0, "mask": np.ones((H, W), bool), "box": [1, 2, 3, 4]}, "not both"),
    ]
    for case, words in cases:
        with pytest.raises(APIError, match=words) as e:
            mine.add_prompt(obj_id=1, **case)
        assert e.value.status == 400
    assert mine.describe()["objects"] == []  # no half-made object left behind
    for call, words in [
        (lambda: mine.propagate(), "add a prompt"),
        (lambda: mine.add_frame(frames[0]), "live sessions only"),
    ]:
        with pytest.raises(APIError, match=words):
            call()
    mine.add_prompt(0, 1, points=[[30, 36]], labels=[1])
    for kwargs, words in [
        ({"direction": "sideways"}, "direction"),
        ({"start_frame_index": 3}, "out of range"),
    ]:
        with pytest.raises(APIError, match=words):
            mine.propagate(**kwargs)
    live = session(model, None)
    with pytest.raises(APIError, match="no frame yet"):
        live.add_prompt(0, 1, points=[[1, 1]], labels=[1])
    live.add_frame(frames[0])
    live.add_frame(frames[1])
    with pytest.raises(APIError, match="newest frame, 1"):
        live.add_prompt(0, 1, points=[[1, 1]], labels=[1])
    with pytest.raises(APIError, match="every frame of a session must be 96x72"):
        live.add_frame(frames[0][:10])
    with pytest.raises(APIError, match="propagate needs a clip"):
        live.propagate()
    live.close()
    with pytest.raises(APIError) as e:
        live.describe()
    assert e.value.status == 404


# ----------------------------------------------------------------------------- decoding, encodings


def mp4(frames: list[np.ndarray], path) -> bytes:
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (frames[0].shape[1], frames[0].shape[0])
    )
    assert writer.isOpened()
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path.read_bytes()


def test_decode_video_reads_mp4_and_enforces_limits(tmp_path):
    frames = clip(6)
    data = mp4(frames, tmp_path / "clip.mp4")
    got = decode_video(data, max_frames=6, max_pixels=H * W)
    assert len(got) == 6 and all(g.shape == (H, W, 3) and g.dtype == np.uint8 for g in got)
    # a lossy codec: near the pixels written, and RGB (a BGR mix-up would swap the red disc's 230 and 40)
    assert np.abs(np.stack(got).astype(int) - np.stack(frames)).mean() < 12
    assert got[0][36, 20, 0] > 150 and got[0][36, 20, 2] < 120
    assert len(read_video_file(tmp_path / "clip.mp4", 6, H * W)) == 6
    for kwargs, words in [
        ({"max_frames": 5, "max_pixels": H * W}, "more than 5 frames"),
        ({"max_frames": 6, "max_pixels": H * W - 1}, f"{H * W} pixels, more than the limit of {H * W - 1}"),
    ]:
        with pytest.raises(APIError, match=words) as e:
            decode_video(data, **kwargs)
        assert e.value.status == 413
    for bad in (b"", b"not a video at all" * 20, data[: len(data) // 3]):
        with pytest.raises(APIError) as e:
            decode_video(bad, 6, H * W)
        assert e.value.status == 400 and e.value.code == "invalid_video"


def test_mask_encodings_decode_to_the_same_pixels():
    yy, xx = np.mgrid[:H, :W]
    mask = ((xx - 30) ** 2 + (yy - 30) ** 2 < 15**2) | ((xx > 60) & (xx < 80) & (yy > 40) & (yy < 60))
    rle = encode_mask(mask, "coco_rle")
    np.testing.assert_array_equal(
        coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask
    )
    png = np.asarray(Image.open(io.BytesIO(pybase64.b64decode(encode_mask(mask, "png")))))
    np.testing.assert_array_equal(png > 0, mask)
    outlines = encode_mask(mask, "polygons")
    assert len(outlines) == 2
    filled = np.zeros((H, W), np.uint8)
    cv2.fillPoly(filled, [np.asarray(p, np.int32) for p in outlines], 1)
    np.testing.assert_array_equal(filled.astype(bool), mask)  # borders are inside: the outline is exact
    answer = frame_answer(
        FrameResult(4, [TrackedObject(2, mask, 0.75), TrackedObject(5, np.zeros((H, W), bool), 0.1)])
    )
    assert answer["frame_index"] == 4
    one, empty = answer["objects"]
    assert (one["obj_id"], one["score"], one["area"]) == (2, 0.75, int(mask.sum()))
    assert (
        one["bbox"]
        == [16, 16, 64, 44]
        == coco_mask.toBbox(coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))).tolist()
    )
    assert (empty["area"], empty["bbox"]) == (0, None)
    with pytest.raises(APIError):
        encode_mask(mask, "jpeg")
