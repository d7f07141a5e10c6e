"""SAM 3 video sessions over HTTP, through the session routes SAM 2 uses: a text or box prompt
tracked through a clip equals sam3's own video model in this process on the same tiny weights; a
live session; the client and its ``track`` command; bad input, limits and a killed worker.

One server with one worker serves the module on a checkpoint in the released layout (``detector.``
and ``tracker.`` keys): its image model loads the detector, and the first session builds the video
model around that detector (apis/sam3/video.py). The references build sam3's whole video model
from the same file, strictly, and run it the library's way (``init_state`` on the frames,
``add_prompt``, ``propagate_in_video``). The session maths (points, live frames, feature reuse) is
tested without a server in tests/unit/test_sam3_video.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time

import cv2
import numpy as np
import pybase64
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from apis.core.encodings import largest_polygon
from apis.sam3.video import Sam3VideoArch, build_sam3_video
from clients import sam3_client
from clients.common import VisionServeError
from tests.conftest import KEYS, ROOT, ServerProcess
from tests.unit.test_sam3_video import tiny_model

ARCH = ROOT / "configs" / "models" / "sam3-video-tiny.json"
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
N, H, W = 4, 48, 64
TEXT = "cat"
BOX = [8.0, 6.0, 40.0, 30.0]  # x1, y1, x2, y2 in pixels


def clip(n: int = N) -> list[np.ndarray]:
    """Noise shifted right by 2 px a frame: the tiny model finds instances above sam3's
    new-object threshold on it."""
    base = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def png(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return pybase64.b64encode_as_string(buf.getvalue())


def decode(rle: dict) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam3-video-http") / "sam3-video-tiny.pt"
    torch.save({"model": tiny_model().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def library(checkpoint):
    """sam3's whole video model on the checkpoint, loaded strictly as sam3's builder does."""
    model = build_sam3_video(Sam3VideoArch.from_json(ARCH))
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"], strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def reference(library):
    """Every frame's outputs of the library for a text (or one exemplar box, as sam3 takes it:
    normalised x, y, w, h) on frame 0, propagated forward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's worker computes at the same time on this machine

    @torch.inference_mode()
    def run(
        frames: list[np.ndarray], text: str | None, box: list[float] | None = None
    ) -> list[tuple[int, dict]]:
        state = library.init_state(
            resource_path=[Image.fromarray(f) for f in frames], offload_video_to_cpu=True
        )
        if box is None:
            out = [library.add_prompt(state, 0, text_str=text)]
        else:
            x1, y1, x2, y2 = box
            xywh = [[x1 / W, y1 / H, (x2 - x1) / W, (y2 - y1) / H]]
            out = [library.add_prompt(state, 0, text_str=text, boxes_xywh=xywh, box_labels=[1])]
        return out + list(library.propagate_in_video(state, None, None, reverse=False))

    yield run
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    config = {
        "sam3": {
            "max_batch_size": 4,
            "epsilon_factor": 0.01,
            "video": {"max_sessions": 2, "max_frames": 6, "max_video_bytes": 200_000, "idle_ttl_s": 60},
            "models": [{"name": "sam3-video-tiny", "weights": str(checkpoint), "arch_config": str(ARCH)}],
        },
    }
    env = {"OMP_NUM_THREADS": "1"}
    proc = ServerProcess(config, tmp_path_factory.mktemp("sam3-video-server"), ["--api-key", KEYS[0]], env)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def call(server, method: str, path: str, body: dict | None = None, **kw) -> requests.Response:
    return requests.request(
        method, f"{server.url}/sam3/video/sessions{path}", json=body, headers=AUTH, timeout=300, **kw
    )


def open_session(server, frames: list[np.ndarray]) -> str:
    r = call(server, "POST", "", {"frames": [png(f) for f in frames]})
    assert r.status_code == 201, r.text
    assert (r.json()["num_frames"], r.json()["width"], r.json()["height"]) == (len(frames), W, H)
    return r.json()["session_id"]


def same_frame(got: dict, frame_index: int, out: dict) -> None:
    """One frame on the wire against the library's outputs: ids, scores, masks, and the derived
    area, bbox and polygon (the server's epsilon_factor, 0.01)."""
    assert got["frame_index"] == frame_index
    objects = got["objects"]
    assert [o["obj_id"] for o in objects] == out["out_obj_ids"].tolist()
    np.testing.assert_allclose([o["score"] for o in objects], out["out_probs"], atol=1e-5)
    for o, mask in zip(objects, out["out_binary_masks"], strict=True):
        mask = np.asarray(mask, dtype=bool)
        assert np.array_equal(decode(o["mask"]), mask)
        assert o["area"] == int(mask.sum())
        ys, xs = np.nonzero(mask)
        assert o["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert o["polygon"] == largest_polygon(mask, 0.01)[0]


@pytest.mark.parametrize("prompt", [{"text": TEXT}, {"boxes": [BOX], "box_labels": [1]}], ids=["text", "box"])
def test_prompt_propagated_equals_the_library(server, reference, prompt):
    frames = clip()
    text = prompt.get("text")
    expected = reference(frames, text, BOX if "boxes" in prompt else None)
    sid = open_session(server, frames)
    r = call(server, "POST", f"/{sid}/prompts", {"frame_index": 0, **prompt})
    assert r.status_code == 200, r.text
    same_frame(r.json(), *expected[0])
    r = call(server, "POST", f"/{sid}/propagate", {}, stream=True)
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] and lines[-1]["frames"] == N
    for got, (index, out) in zip(lines[:-1], expected[1:], strict=True):
        same_frame(got, index, out)
    assert sum(len(line["objects"]) for line in lines[:-1]) > 0  # instances were tracked
    info = call(server, "GET", f"/{sid}").json()
    assert info["text"] == text and info["num_frames"] == N and info["memory_bytes"] > 0
    assert info["objects"] == sorted({o["obj_id"] for line in lines[:-1] for o in line["objects"]})
    workers = requests.get(server.url + "/info", headers=AUTH, timeout=30).json()["families"]["sam3"][
        "workers"
    ]
    held = {s["session_id"]: s for w in workers for s in w["video_sessions"]["sessions"]}
    assert held[sid]["memory_bytes"] == info["memory_bytes"]
    metrics = requests.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    assert 'visionserve_video_sessions{family="sam3"' in metrics
    assert call(server, "DELETE", f"/{sid}").status_code == 204
    assert call(server, "GET", f"/{sid}").status_code == 404


def test_live_session_answers_each_frame_as_the_session_in_process(server, checkpoint):
    """Frames appended to a live session through ``/frames``, a text prompt on the newest one:
    every answer equals the same live session run in this process on the same weights (whose
    equality with the library's offline propagation tests/unit/test_sam3_video.py checks)."""
    from apis.core.settings import ModelEntry
    from apis.sam3.model import load_sam3
    from apis.sam3.video import VideoSession, video_model

    entry = ModelEntry(name="sam3-video-tiny", weights=str(checkpoint), arch_config=ARCH)
    local = VideoSession.open(video_model(load_sam3(entry, "cpu")), None)
    frames, found = clip(), 0
    with sam3_client.Sam3VideoSession(server.url + "/sam3", api_key=KEYS[0]) as session:
        for i, frame in enumerate(frames):
            got = session.add_frame(frame)
            want = local.add_frame(frame)
            if i == 1:
                got, want = session.prompt(1, text=TEXT), local.add_prompt(1, text=TEXT)
            assert got["frame_index"] == want.frame_index == i
            assert [o["obj_id"] for o in got["objects"]] == [o.obj_id for o in want.objects]
            found += len(want.objects)
            for o, w in zip(got["objects"], want.objects, strict=True):
                assert abs(o["score"] - w.score) <= 1e-5 and np.array_equal(o["mask"], w.mask)
        assert session.info()["live"] and session.info()["num_frames"] == N
    assert found > 0


def test_bad_prompts_and_limits_get_their_4xx(server):
    sid = open_session(server, clip(2))
    cases = [
        ({"frame_index": 2, "text": TEXT}, 400, "out of range"),
        ({"frame_index": 0, "text": ""}, 422, "blank"),
        ({"frame_index": 0}, 422, "give a text, boxes"),
        ({"frame_index": 0, "boxes": [[0, 0, 80, 10]]}, 400, "x2 <= 64"),
        ({"frame_index": 0, "points": [[5, 5]], "point_labels": [1]}, 422, "obj_id"),
        ({"frame_index": 0, "text": TEXT, "box_labels": [1]}, 422, "box_labels needs boxes"),
    ]
    for body, status, words in cases:
        r = call(server, "POST", f"/{sid}/prompts", body)
        assert r.status_code == status and words in r.text, (body, r.status_code, r.text)
    r = call(server, "POST", f"/{sid}/propagate", {})  # nothing prompted yet
    assert r.status_code == 400 and "add a prompt" in r.text
    r = call(server, "POST", "", {"frames": [png(f) for f in clip(7)]})
    assert r.status_code == 413 and "6" in r.json()["error"]["message"]  # video.max_frames
    r = call(server, "POST", "", {"frames": [png(clip(1)[0])], "offload_state_to_cpu": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "offload_state_to_cpu"
    assert call(server, "GET", "/nope").status_code == 404
    call(server, "DELETE", f"/{sid}")


def test_client_session_and_track_command(server, reference, tmp_path):
    """Sam3VideoSession on frames, and ``track`` on an MP4: its JSON equals the library on the
    frames OpenCV decodes from the same file."""
    kw = {"base_url": server.url + "/sam3", "api_key": KEYS[0]}
    frames = clip()
    expected = reference(frames, TEXT)
    with sam3_client.Sam3VideoSession(frames=frames, **kw) as session:
        first = session.prompt(0, text=TEXT)
        assert [o["obj_id"] for o in first["objects"]] == expected[0][1]["out_obj_ids"].tolist()
        got = list(session.propagate())
        assert session.last_totals["frames"] == N
        for frame, (index, out) in zip(got, expected[1:], strict=True):
            assert frame["frame_index"] == index
            for o, mask in zip(frame["objects"], out["out_binary_masks"], strict=True):
                assert np.array_equal(o["mask"], np.asarray(mask, dtype=bool))
        sid = session.session_id
    assert call(server, "GET", f"/{sid}").status_code == 404  # closed by the with block

    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    capture, decoded = cv2.VideoCapture(str(path)), []
    while (read := capture.read())[0]:
        decoded.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    expected = reference(decoded, TEXT)
    out = tmp_path / "out.json"
    args = ["track", str(path), "--text", TEXT, "--out", str(out), "--overlay", str(tmp_path / "o.mp4")]
    assert sam3_client.main([*args, "--base-url", kw["base_url"], "--api-key", kw["api_key"]]) == 0
    saved = json.loads(out.read_text())
    assert saved["encoding"] == "coco_rle" and saved["text"] == TEXT
    assert sorted(int(k) for k in saved["frames"]) == list(range(len(decoded)))
    for index, out_ in expected[1:]:
        objects = saved["frames"][str(index)]
        assert [o["obj_id"] for o in objects] == out_["out_obj_ids"].tolist()
        for o, mask in zip(objects, out_["out_binary_masks"], strict=True):
            assert np.array_equal(decode(o["mask"]), np.asarray(mask, dtype=bool))
    assert cv2.VideoCapture(str(tmp_path / "o.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == len(decoded)


def test_a_session_whose_worker_died_is_lost(server):
    """Last: it kills the module's only worker. The HTTP process answers 410 by itself, to the
    client too."""
    session = sam3_client.Sam3VideoSession(server.url + "/sam3", frames=clip(2), api_key=KEYS[0])
    worker = session.info()["worker"]
    workers = requests.get(server.url + "/info", headers=AUTH, timeout=30).json()["families"]["sam3"][
        "workers"
    ]
    os.kill(next(w["pid"] for w in workers if w["worker"] == worker), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (
        r := call(server, "GET", f"/{session.session_id}")
    ).status_code != 410 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.status_code == 410 and r.json()["error"]["code"] == "session_lost", r.text
    assert "start a new session" in r.json()["error"]["message"]
    with pytest.raises(VisionServeError) as e:
        session.prompt(0, text=TEXT)
    assert e.value.status == 410
    session.close()  # a lost session closes without error
