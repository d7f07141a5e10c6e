"""SAM 3 video sessions without a server, against sam3's own video model driven the library's way
(``init_state`` on the frames as PIL images, ``add_prompt``, ``propagate_in_video``) with the
same tiny random weights: every frame's instances (ids, scores, masks) must be the library's."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from apis.core.errors import APIError
from apis.core.settings import ModelEntry
from apis.sam3 import internals as sam3_internals
from apis.sam3.video import (
    Sam3VideoArch,
    VideoSession,
    build_sam3_video,
    build_tracker,
    load_sam3_video,
    load_video_checkpoint,
)
from tests.conftest import ROOT
from tests.unit.test_sam3_units import _settings

ARCH = ROOT / "configs" / "models" / "sam3-video-tiny.json"
N, H, W = 4, 48, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model's small ops on two threads of a busy 2-core machine wait
    on each other (a 5-frame propagation took 30 s instead of 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_sam3_video(Sam3VideoArch.from_json(ARCH))
    sam3_internals.init_untrained(model)
    with torch.no_grad():  # detections above sam3's new-object threshold (0.7), as trained ones are
        model.detector.dot_prod_scoring.hs_proj.weight.mul_(8)
        model.detector.transformer.decoder.presence_token_head.layers[-1].bias.fill_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam3video") / "sam3-video-tiny.pt"
    torch.save({"model": tiny_model().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def library(checkpoint):
    """sam3's video model on the checkpoint, loaded as sam3's builder loads it (strict)."""
    model = build_sam3_video(Sam3VideoArch.from_json(ARCH))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"], strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def model(checkpoint):
    entry = ModelEntry(name="sam3-video-tiny", weights=str(checkpoint), arch_config=ARCH)
    return load_sam3_video(entry, "cpu")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(N)]


def same(got, expected) -> None:
    """A session's FrameResults against the library's (frame_idx, outputs) pairs."""
    assert [r.frame_index for r in got] == [f for f, _ in expected]
    for r, (_, out) in zip(got, expected, strict=True):
        assert [o.obj_id for o in r.objects] == out["out_obj_ids"].tolist()
        np.testing.assert_allclose([o.score for o in r.objects], out["out_probs"], atol=1e-5)
        for o, mask in zip(r.objects, out["out_binary_masks"], strict=True):
            assert o.mask.shape == (H, W) and o.mask.dtype == bool
            assert np.array_equal(o.mask, mask)


def test_text_prompt_then_points_match_the_library(library, model, frames):
    state = library.init_state(resource_path=[Image.fromarray(f) for f in frames], offload_video_to_cpu=True)
    expected = [library.add_prompt(state, 0, text_str="cat")]
    expected += list(library.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=N))
    point = [[40.0, 20.0]]
    refined = [
        library.add_prompt(
            state, 1, points=torch.tensor([[40 / W, 20 / H]]), point_labels=torch.tensor([1]), obj_id=7
        )
    ]
    refined += list(library.propagate_in_video(state, start_frame_idx=1, max_frame_num_to_track=N))

    session = VideoSession.open(model, frames)
    assert (session.num_frames, session.width, session.height, session.live) == (N, W, H, False)
    session.add_prompt(0, text="dog")  # another concept first: the frame's features are kept
    passes = session.features.image_passes
    got = [session.add_prompt(0, text="cat")]
    assert session.features.image_passes == passes  # frame 0 (and the look-ahead frame 1) reused
    got += list(session.propagate("forward", start_frame_index=0, max_frames=N))
    same(got, expected)
    assert any(r.objects for r in got)

    got = [session.add_prompt(1, points=point, point_labels=[1], obj_id=7)]
    got += list(session.propagate("forward", start_frame_index=1, max_frames=N))
    same(got, refined)
    info = session.describe()
    assert info["num_frames"] == N and info["text"] == "cat" and info["memory_bytes"] > 0
    session.close()
    with pytest.raises(APIError) as e:
        session.describe()
    assert e.value.status == 404


def test_box_prompt_both_directions_matches_the_library(library, model, frames):
    box = [8.0, 6.0, 40.0, 30.0]  # x1, y1, x2, y2 in pixels
    xywh = [[8 / W, 6 / H, 32 / W, 24 / H]]
    state = library.init_state(resource_path=[Image.fromarray(f) for f in frames], offload_video_to_cpu=True)
    expected = [library.add_prompt(state, 2, boxes_xywh=xywh, box_labels=[1])]
    expected += list(library.propagate_in_video(state, start_frame_idx=2, reverse=False))
    expected += list(library.propagate_in_video(state, start_frame_idx=2, reverse=True))

    session = VideoSession.open(model, frames)
    got = [session.add_prompt(2, boxes=[box], box_labels=[True])]
    got += list(session.propagate("both", start_frame_index=2))
    same(got, expected)
    assert [r.frame_index for r in got] == [2, 2, 3, 1, 0]


def test_live_equals_offline_without_temporal_disambiguation(checkpoint, model, frames):
    """Live frames 0..4 (a text prompt after the first) equal offline propagation over a clip
    that starts with them, on the model variant without sam3's hot-start delay (with it, offline
    answers for a frame wait for the next 15 frames, which a live frame cannot)."""
    arch = dataclasses.replace(Sam3VideoArch.from_json(ARCH), temporal_disambiguation=False)
    plain = build_sam3_video(arch)
    load_video_checkpoint(plain, checkpoint)
    plain.eval()
    clip = [np.roll(frames[i % N], 5 * (i // N), axis=0) for i in range(16)]  # trackers read 16 pointers
    state = plain.init_state(resource_path=[Image.fromarray(f) for f in clip], offload_video_to_cpu=True)
    plain.add_prompt(state, 0, text_str="cat")
    expected = list(plain.propagate_in_video(state, start_frame_idx=0, max_frame_num_to_track=4))

    live = VideoSession.open(plain, None)
    assert live.live and live.describe()["num_frames"] == 0
    with pytest.raises(APIError, match="no frames yet"):
        live.add_prompt(0, text="cat")
    assert live.add_frame(clip[0]).objects == []  # no concept yet
    got = [live.add_prompt(0, text="cat")]  # the prompted frame as propagation answers it
    got += [live.add_frame(f) for f in clip[1:5]]
    same(got, expected)
    assert live.num_frames == 5 and live.describe()["num_frames"] == 5
    with pytest.raises(APIError, match=r"newest frame \(4\), not 2"):
        live.add_prompt(2, text="cat")

    hotstart = VideoSession.open(model, None)  # the released heuristics run live too
    hotstart.add_frame(clip[0])
    hotstart.add_prompt(0, text="cat")
    assert [hotstart.add_frame(f).frame_index for f in clip[1:3]] == [1, 2]
    with pytest.raises(APIError, match="must be 64x48"):
        hotstart.add_frame(clip[0][:, :10])


def test_bad_input_is_a_clear_400(model, frames):
    with pytest.raises(APIError, match="must be 64x48"):
        VideoSession.open(model, [frames[0], frames[0][:, :10]])
    session = VideoSession.open(model, frames[:2])
    cases = [
        (lambda: session.add_prompt(2, text="cat"), "out of range"),
        (lambda: session.add_prompt(0), "needs a text, boxes or points"),
        (
            lambda: session.add_prompt(0, boxes=[[0, 0, 10, 10]], box_labels=[True, False]),
            "1 boxes but 2 box_labels",
        ),
        (lambda: session.add_prompt(0, boxes=[[0, 0, 100, 10]]), "0 <= x1 < x2 <= 64"),
        (lambda: session.add_prompt(0, points=[[1, 1]], point_labels=[1]), "obj_id"),
        (lambda: session.add_prompt(0, points=[[1, 1]], point_labels=[1], obj_id=1), "no outputs yet"),
        (lambda: session.propagate(), "add a prompt before propagating"),
        (lambda: session.propagate("sideways"), "direction must be one of"),
        (lambda: session.add_frame(frames[0]), "live sessions only"),
    ]
    for call, message in cases:
        with pytest.raises(APIError, match=message) as e:
            call()
        assert e.value.status == 400


def test_default_tracker_is_the_released_one():
    """The tracker at the default sizes has sam3's ``build_tracker`` parameter names, shapes and
    module settings, so the released checkpoint's ``tracker.`` keys load strictly (the detector
    is the image model's, checked in test_sam3_units)."""
    from sam3.model_builder import build_tracker as sam3_build_tracker

    ours = build_tracker(Sam3VideoArch())
    theirs = sam3_build_tracker(apply_temporal_disambiguation=True)
    shapes = {k: v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    assert _settings(ours) == _settings(theirs)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path, checkpoint, library):
    state = torch.load(checkpoint, weights_only=True)["model"]
    del state["tracker.maskmem_tpos_enc"]
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    with pytest.raises(ValueError, match=r"(?s)does not fit.*tracker\.maskmem_tpos_enc"):
        load_video_checkpoint(library, bad)  # what it loads before refusing is the same weights


def _components(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components by breadth-first search: (foreground label > 0, component size)."""
    labels = np.zeros(plane.shape, dtype=np.int64)
    sizes = np.zeros(plane.shape, dtype=np.int64)
    count = 0
    for start in zip(*np.nonzero(plane), strict=True):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue, members = deque([start]), [start]
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    if (
                        0 <= q[0] < plane.shape[0]
                        and 0 <= q[1] < plane.shape[1]
                        and plane[q]
                        and not labels[q]
                    ):
                        labels[q] = count
                        queue.append(q)
                        members.append(q)
        for m in members:
            sizes[m] = len(members)
    return labels, sizes


def test_cpu_connected_components():
    """The OpenCV replacement of sam3's CPU connected components: sizes per pixel as a plain
    search finds them, shapes kept, and an empty batch (sam3's own version fails on it)."""
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((3, 1, 17, 23)) > 0.6).to(torch.uint8)
    labels, sizes = sam3_internals.connected_components_cpu(masks)
    assert labels.shape == sizes.shape == masks.shape
    for i in range(3):
        ref_labels, ref_sizes = _components(masks[i, 0].numpy().astype(bool))
        assert np.array_equal(labels[i, 0].numpy() > 0, ref_labels > 0)
        assert np.array_equal(sizes[i, 0].numpy(), ref_sizes)
    labels, sizes = sam3_internals.connected_components_cpu(torch.zeros(0, 1, 8, 8, dtype=torch.uint8))
    assert labels.shape == sizes.shape == (0, 1, 8, 8)


def test_cuda_assumptions_are_answered_on_cpu(library):
    """Without CUDA, the tracker keeps its per-frame state on its own device and ``.cuda()``
    leaves a tensor where it is (sam3 calls both unconditionally)."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA host keeps sam3's behaviour")
    t = torch.ones(2)
    assert t.cuda() is t
    state = library.tracker.init_state(video_height=H, video_width=W, num_frames=N)
    assert state["storage_device"] == library.tracker.device == torch.device("cpu")


def test_video_model_shares_the_image_models_detector(checkpoint, tmp_path):
    """The worker's video model (built on the first session) holds the image model's detector
    modules themselves; only the tracker and the tracker's neck convolutions are its own, loaded
    from the checkpoint. A checkpoint without a tracker is refused with what is missing."""
    from apis.sam3.model import load_sam3
    from apis.sam3.video import TRACKER_KEYS, video_model

    entry = ModelEntry(name="sam3-video-tiny", weights=str(checkpoint), arch_config=ARCH)
    runner = load_sam3(entry, "cpu")
    video = video_model(runner)
    assert video_model(runner) is video  # made once
    image = {t.data_ptr() for t in runner.model.state_dict().values()}
    state = torch.load(checkpoint, weights_only=True)["model"]
    for name, value in video.state_dict().items():
        own = name.startswith(TRACKER_KEYS)
        assert (value.data_ptr() in image) != own or not value.numel(), name
        assert torch.equal(value, state[name]), name  # every weight is the checkpoint's

    detector_only = tmp_path / "detector.pt"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("tracker.")}}, detector_only)
    runner = load_sam3(entry.model_copy(update={"weights": str(detector_only)}), "cpu")
    with pytest.raises(ValueError, match=r"no video tracker.*tracker\."):
        video_model(runner)
