"""The SAM 2 video client against the real server: ``Sam2VideoSession`` (clip and live) and the
``track`` command, values against sam2's own ``SAM2VideoPredictor`` on the same checkpoint.

The clip is JPEG frames (what the library's ``init_state`` reads); the client sends the pixels
decoded from them, so the server tracks exactly what the reference tracks.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from clients import sam2_client as sc
from clients.common import VisionServeError, get
from clients.masks import decode_png
from tests.conftest import KEYS, ROOT, ServerProcess

ARCH = ROOT / "configs" / "models" / "sam2-tiny.json"
SPEC = json.loads(ARCH.read_text())
H, W, N = 48, 64, 7
POINT = {"points": [[22.0, 24.0]], "labels": [1]}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """sam2's video predictor with seeded random weights (objects "present": masks not empty),
    its checkpoint file, and the clip as a JPEG folder with the frames decoded from it."""
    from sam2.build_sam import build_sam2_video_predictor

    from apis.sam2.model import install_cpu_connected_components

    install_cpu_connected_components()  # hole filling on the CPU, as in the server
    torch.manual_seed(1)
    predictor = build_sam2_video_predictor(
        SPEC["config"], None, device="cpu", hydra_overrides_extra=SPEC["overrides"]
    )
    with torch.no_grad():
        predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(2.0)
    tmp = tmp_path_factory.mktemp("sam2-video-client")
    torch.save({"model": predictor.state_dict()}, tmp / "sam2-tiny.pt")
    folder = tmp / "jpeg"
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    frames = []
    for t in range(N):
        img = rng.integers(0, 90, (H, W, 3), dtype=np.uint8)
        img[(yy - 24) ** 2 + (xx - 18 - 3 * t) ** 2 < 100] = (230, 200, 40)
        Image.fromarray(img).save(folder / f"{t:05d}.jpg", quality=95)
        frames.append(np.asarray(Image.open(folder / f"{t:05d}.jpg").convert("RGB")))
    return predictor, tmp / "sam2-tiny.pt", str(folder), frames


@pytest.fixture(scope="module")
def server(tmp_path_factory, library):
    config = {
        "sam2": {
            "video": {"max_sessions": 4, "max_frames": 20, "idle_ttl_s": 120},
            "models": [{"name": "sam2.1_hiera_t", "weights": str(library[1]), "arch_config": str(ARCH)}],
        },
        "inputs": {"path": {"roots": [library[2]]}},  # the clip's JPEG frames, for add_frame(image_path=)
    }
    proc = ServerProcess(
        config, tmp_path_factory.mktemp("server"), ["--api-key", KEYS[0]], {"OMP_NUM_THREADS": "1"}
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture
def kw(server):
    return {"base_url": server.url + "/sam2", "api_key": KEYS[0]}


@pytest.fixture(scope="module")
def reference(library):
    """Masks per frame of the library's propagation from a click on frame 0 (frame 0: the
    prompt's answer)."""
    predictor, _, folder, _ = library
    state = predictor.init_state(folder)
    _, _, first = predictor.add_new_points_or_box(state, 0, 1, **POINT)
    out = {0: (first[0, 0] > 0).numpy()}
    for f, _, masks in list(predictor.propagate_in_video(state))[1:]:
        out[f] = (masks[0, 0] > 0).numpy()
    assert any(m.any() for m in out.values())
    return out


def test_clip_session_prompts_propagates_and_closes(kw, library, reference):
    frames = library[3]
    with sc.Sam2VideoSession(frames=frames, **kw) as session:
        assert (session.num_frames, session.created["width"], session.created["height"]) == (N, W, H)
        first = session.prompt(0, 1, **POINT)
        np.testing.assert_array_equal(first["objects"][0]["mask"], reference[0])
        got = list(session.propagate())
        assert [f["frame_index"] for f in got] == list(range(N))
        for f in got:
            (obj,) = f["objects"]
            assert obj["obj_id"] == 1 and obj["mask"].dtype == bool
            np.testing.assert_array_equal(obj["mask"], reference[f["frame_index"]])
            assert obj["area"] == int(obj["mask"].sum())
        assert session.last_totals["frames"] == N
        for frame in session.propagate(max_frames=3):  # a stream left after one frame
            assert frame["frame_index"] == 0
            break
        assert session.info()["objects"] == [1]
        sid = session.session_id
    with pytest.raises(VisionServeError) as e:  # closed: deleted on the server
        get("sam2", f"video/sessions/{sid}", kw["base_url"], kw["api_key"])
    assert e.value.status == 404


def test_live_session_and_png_answers_equal_the_library(kw, library, reference):
    frames = library[3]
    with sc.Sam2VideoSession(mask_encoding="png", **kw) as session:
        assert session.add_frame(frames[0])["objects"] == []
        answers = [session.prompt(0, 1, **POINT)]
        # odd frames as images, even ones as files on the server (the same JPEGs the library reads)
        answers += [
            session.add_frame(f) if i % 2 else session.add_frame(image_path=f"{i:05d}.jpg")
            for i, f in enumerate(frames[1:], start=1)
        ]
        for i, a in enumerate(answers):
            assert a["frame_index"] == i
            np.testing.assert_array_equal(a["objects"][0]["mask"], reference[i])
        assert session.info()["frames_held"] == 1
        with pytest.raises(VisionServeError) as e:
            session.prompt(0, 2, **POINT)  # not the newest frame
        assert e.value.status == 400 and "newest frame" in e.value.message


def test_track_command_writes_masks_and_an_overlay(kw, library, tmp_path):
    """``track`` on an MP4: one COCO-RLE JSON equal to the session's answers on the same clip,
    per-frame PNGs, and an overlay MP4 with every frame."""
    frames = library[3]
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    common = [
        "track",
        str(clip),
        "--point",
        "22,24",
        "--base-url",
        kw["base_url"],
        "--api-key",
        kw["api_key"],
    ]
    assert (
        sc.main(
            [*common, "--out", str(tmp_path / "rle"), "--format", "rle", "--overlay", str(tmp_path / "o.mp4")]
        )
        == 0
    )
    saved = json.loads((tmp_path / "rle" / "masks.json").read_text())["frames"]
    with sc.Sam2VideoSession(video=clip, **kw) as session:
        session.prompt(0, 1, points=[[22, 24]], labels=[1])
        want = {f["frame_index"]: f["objects"][0]["mask"] for f in session.propagate("both")}
    assert sorted(int(k) for k in saved) == list(range(N)) == sorted(want)
    for k, objects in saved.items():
        np.testing.assert_array_equal(sc.decode_rle(objects[0]["mask"]), want[int(k)])
    capture = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == N
    capture.release()
    assert sc.main([*common, "--out", str(tmp_path / "png")]) == 0
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}_obj1.png" for i in range(N)]
    np.testing.assert_array_equal(decode_png(pngs[3].read_bytes()), want[3])
