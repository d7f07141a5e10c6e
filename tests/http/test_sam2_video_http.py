"""SAM 2 video sessions over HTTP: the wire (NDJSON streams, masks, ids, errors), sessions pinned
to their worker, streams that interleave and stop when their client leaves.

One server with two workers on the tiny SAM 2.1 serves the module; the references run sam2's own
``SAM2VideoPredictor`` in this process on the same checkpoint and the same JPEG frames. The maths
of the session (box and mask prompts, backward, live memory) is tested on its own in
tests/unit/test_sam2_video.py; here every answer travels through the server.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time

import numpy as np
import pybase64
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from clients.common import VisionServeError
from clients.sam2_client import Sam2VideoSession
from tests.conftest import KEYS, ROOT, ServerProcess

ARCH = ROOT / "configs" / "models" / "sam2-tiny.json"
SPEC = json.loads(ARCH.read_text())
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
POINT = {"frame_index": 0, "obj_id": 1, "points": [[40, 30]], "labels": [1]}


def clip(n: int, h: int = 48, w: int = 64, seed: int = 0) -> list[bytes]:
    """JPEG frames of a bright disc moving right over noise (what sam2's loader reads)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    frames = []
    for t in range(n):
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        img[(yy - h // 2) ** 2 + (xx - 20 - 2 * t) ** 2 < 100] = (230, 200, 40)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        frames.append(buf.getvalue())
    return frames


def b64(data: bytes) -> str:
    return pybase64.b64encode_as_string(data)


def decode(rle: dict) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """sam2's own video predictor with seeded random weights, and the checkpoint file of them."""
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    predictor = build_sam2_video_predictor(
        SPEC["config"], None, device="cpu", hydra_overrides_extra=SPEC["overrides"]
    )
    with torch.no_grad():  # objects "present" (object-score logit > 0): masks are not all empty
        predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(2.0)
    path = tmp_path_factory.mktemp("sam2-video") / "sam2-tiny.pt"
    torch.save({"model": predictor.state_dict()}, path)
    return predictor, path


@pytest.fixture(scope="module")
def checkpoint(library):
    return library[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    config = {
        "sam2": {
            "max_batch_size": 4,
            "workers_per_device": 2,
            "video": {"max_sessions": 3, "max_frames": 40, "max_video_bytes": 200_000, "idle_ttl_s": 60},
            "models": [{"name": "sam2.1_hiera_t", "weights": str(checkpoint), "arch_config": str(ARCH)}],
        },
    }
    env = {"OMP_NUM_THREADS": "1"}
    proc = ServerProcess(config, tmp_path_factory.mktemp("sam2-video-server"), ["--api-key", KEYS[0]], env)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def call(server, method: str, path: str, body: dict | None = None, **kw) -> requests.Response:
    return requests.request(method, f"{server.url}/sam2/video/sessions{path}", json=body, headers=AUTH, **kw)


def open_session(server, frames: list[bytes]) -> str:
    r = call(server, "POST", "", {"frames": [b64(f) for f in frames]})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def lines(response: requests.Response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


@pytest.fixture(scope="module")
def reference(library, tmp_path_factory):
    """sam2's own predictor on the same checkpoint: masks per frame for a clip and prompts. Its
    hole filling runs on the CPU here as in the server (sam2 skips it without its CUDA kernel)."""
    from apis.sam2.model import install_cpu_connected_components

    install_cpu_connected_components()
    predictor = library[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's workers compute at the same time on this machine

    def run(frames: list[bytes], prompts: list[dict], **propagate: int) -> dict[int, dict[int, np.ndarray]]:
        folder = tmp_path_factory.mktemp("frames")
        for i, data in enumerate(frames):
            (folder / f"{i:05d}.jpg").write_bytes(data)
        state = predictor.init_state(str(folder))
        for p in prompts:
            predictor.add_new_points_or_box(
                state,
                p["frame_index"],
                p["obj_id"],
                points=np.array(p["points"], np.float32),
                labels=np.array(p["labels"], np.int32),
                clear_old_points=p.get("clear_old_points", True),
            )
        return {
            t: {int(o): (logits[i, 0] > 0).numpy() for i, o in enumerate(ids)}
            for t, ids, logits in predictor.propagate_in_video(state, **propagate)
        }

    yield run
    torch.set_num_threads(threads)


def test_point_prompt_propagated_forward_equals_the_library(server, reference):
    frames = clip(6)
    sid = open_session(server, frames)
    r = call(server, "POST", f"/{sid}/prompts", POINT)
    assert r.status_code == 200, r.text
    assert r.json()["frame_index"] == 0 and [o["obj_id"] for o in r.json()["objects"]] == [1]
    r = call(server, "POST", f"/{sid}/propagate", {"direction": "forward"}, stream=True)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    got = lines(r)
    want = reference(frames, [POINT])
    assert [g["frame_index"] for g in got[:-1]] == list(range(6))
    assert got[-1]["done"] and got[-1]["frames"] == 6
    for line in got[:-1]:
        (obj,) = line["objects"]
        mask = decode(obj["mask"])
        assert np.array_equal(mask, want[line["frame_index"]][1]), line["frame_index"]
        assert obj["area"] == int(mask.sum()) and 0 <= obj["score"] <= 1
    info = call(server, "GET", f"/{sid}").json()
    assert info["num_frames"] == 6 and info["objects"] == [1] and info["memory_bytes"] > 0
    assert info["last_propagation"]["frames"] == 6 and info["last_propagation"]["ended"] == "done"
    assert call(server, "DELETE", f"/{sid}").status_code == 204
    assert call(server, "GET", f"/{sid}").json()["error"]["code"] == "session_not_found"


def test_backward_from_a_start_frame_and_kept_clicks_equal_the_library(server, reference):
    """``direction``, ``start_frame_index``, ``max_frames`` and ``clear_old_points: false`` over
    HTTP, each against the library given the same: a second click kept with the first, then
    two frames tracked backward from frame 4 (the library's ``max_frame_num_to_track`` counts the
    frames after the first)."""
    frames = clip(6, seed=2)
    sid = open_session(server, frames)
    first = {"frame_index": 4, "obj_id": 1, "points": [[48, 24]], "labels": [1]}
    more = {"frame_index": 4, "obj_id": 1, "points": [[12, 40]], "labels": [1], "clear_old_points": False}
    for prompt in (first, more):
        assert call(server, "POST", f"/{sid}/prompts", prompt).status_code == 200
    body = {"direction": "backward", "start_frame_index": 4, "max_frames": 2}
    got = lines(call(server, "POST", f"/{sid}/propagate", body, stream=True))
    want = reference(frames, [first, more], start_frame_idx=4, max_frame_num_to_track=1, reverse=True)
    assert [g["frame_index"] for g in got[:-1]] == list(want) == [4, 3]
    for line in got[:-1]:
        assert np.array_equal(decode(line["objects"][0]["mask"]), want[line["frame_index"]][1])
    replaced = reference(
        frames, [first, {**more, "clear_old_points": True}], start_frame_idx=4, max_frame_num_to_track=0
    )
    assert not np.array_equal(replaced[4][1], want[4][1])  # the kept click matters
    assert call(server, "DELETE", f"/{sid}").status_code == 204


def test_live_frames_equal_offline_propagation(server, reference):
    """Frames sent one by one to a live session are tracked as the library tracks the same
    frames in a clip (of at least 16 frames: the library's object-pointer window)."""
    frames = clip(16, seed=1)
    with Sam2VideoSession(server.url + "/sam2", api_key=KEYS[0], model_cfg="sam2.1_hiera_tiny") as session:
        assert session.created["live"] and session.num_frames == 0
        sid = session.session_id
        assert session.add_frame(frames[0]) == {"frame_index": 0, "objects": []}
        session.prompt(0, 1, points=[[40, 30]], labels=[1])
        got = [session.add_frame(f) for f in frames[1:5]]
        want = reference(frames, [POINT], max_frame_num_to_track=4)
        assert [g["frame_index"] for g in got] == [1, 2, 3, 4]
        for g in got:
            assert np.array_equal(g["objects"][0]["mask"], want[g["frame_index"]][1])
        with pytest.raises(VisionServeError) as e:  # a live session cannot propagate
            list(session.propagate())
        assert e.value.status == 400
    assert call(server, "GET", f"/{sid}").json()["error"]["code"] == "session_not_found"  # closed on exit


def test_an_mp4_clip_is_decoded_in_the_worker(server, tmp_path):
    import cv2

    path = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for data in clip(5):
        writer.write(cv2.cvtColor(np.asarray(Image.open(io.BytesIO(data))), cv2.COLOR_RGB2BGR))
    writer.release()
    with open(path, "rb") as f:
        r = call(server, "POST", "", {"video": b64(f.read()), "max_frames": 10})
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["num_frames"], body["width"], body["height"]) == (5, 64, 48)
    call(server, "DELETE", f"/{body['session_id']}")


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"frames": ["aGVsbG8="] * 41}, 413, None),  # over video.max_frames (40)
        ({"frames": [b64(b"x" * 300)], "max_frames": 41}, 400, None),  # asks for more than the server allows
        ({"video": b64(os.urandom(210_000))}, 413, None),  # over video.max_video_bytes (200 000)
        ({"video": b64(b"not a video at all")}, 400, "invalid_video"),
        ({"video": "%%%"}, 400, "invalid_base64"),
        ({"frames": [b64(b"not an image")]}, 400, None),
        ({"video_path": "clip.mp4"}, 400, "input_disabled"),
        ({"video": "AAAA", "frames": []}, 422, None),
        ({"model_cfg": "configs/sam2.1/sam2.1_hiera_l.yaml"}, 400, "model_not_found"),
    ],
)
def test_bad_clips_get_their_4xx(server, body, status, code):
    r = call(server, "POST", "", body)
    assert r.status_code == status, r.text
    assert code is None or r.json()["error"]["code"] == code
    if status == 413:
        assert any(ch.isdigit() for ch in r.json()["error"]["message"])


def test_bad_session_calls_get_their_4xx(server):
    sid = open_session(server, clip(3))
    for path, method, body, status in [
        (f"/{sid}/propagate", "POST", {}, 400),  # nothing prompted yet
        (f"/{sid}/prompts", "POST", {**POINT, "frame_index": 3}, 400),  # out of range
        (f"/{sid}/prompts", "POST", {**POINT, "labels": [2]}, 422),
        (f"/{sid}/prompts", "POST", {"frame_index": 0, "obj_id": 1}, 422),  # no prompt
        (f"/{sid}/frames", "POST", {"image": b64(clip(1)[0])}, 400),  # a clip session
        (f"/{sid}/propagate", "POST", {"direction": "sideways"}, 422),
    ]:
        r = call(server, method, path, body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["error"]["message"]
    assert requests.get(f"{server.url}/sam2/video/sessions/{sid}").status_code == 401  # no key
    other = sid[:9] + "A" * 16  # this worker's token, no such session
    for missing in ("nope", "0123abcd-" + "A" * 16, other):
        r = call(server, "GET", f"/{missing}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", r.text
    call(server, "DELETE", f"/{sid}")
    assert call(server, "POST", f"/{sid}/prompts", POINT).status_code == 404


def test_sessions_over_the_limit_evict_the_least_recently_used(server):
    ids = [open_session(server, clip(2)) for _ in range(4)]  # max_sessions 3 per worker
    by_worker: dict[str, list[str]] = {}
    for sid in ids:
        by_worker.setdefault(sid[:8], []).append(sid)
    crowded = max(by_worker.values(), key=len)
    assert len(crowded) == 4  # an idle server puts them on its first worker
    r = call(server, "GET", f"/{crowded[0]}")
    assert r.status_code == 410 and r.json()["error"]["code"] == "session_lost"
    assert "evicted" in r.json()["error"]["message"] and "3" in r.json()["error"]["message"]
    stats = worker_stats(server)
    assert sum(w["video_sessions"]["evictions"]["lru"] for w in stats) >= 1
    for sid in crowded[1:]:
        assert call(server, "DELETE", f"/{sid}").status_code == 204


def worker_stats(server) -> list[dict]:
    body = requests.get(server.url + "/info", headers=AUTH).json()
    return [w for w in body["families"]["sam2"]["workers"] if "video_sessions" in w]


def test_memory_per_session_in_info_and_metrics(server):
    sid = open_session(server, clip(4))
    call(server, "POST", f"/{sid}/prompts", POINT)
    info = call(server, "GET", f"/{sid}").json()
    listed = {s["session_id"]: s for w in worker_stats(server) for s in w["video_sessions"]["sessions"]}
    assert listed[sid]["memory_bytes"] == info["memory_bytes"] > 4 * 3 * 256 * 256  # frames at least
    metrics = requests.get(server.url + "/metrics", headers=AUTH).text
    worker = info["worker"]
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("visionserve_video_session_memory_bytes{") and f'worker="{worker}"' in x
    )
    assert float(line.split()[-1]) >= info["memory_bytes"]
    call(server, "DELETE", f"/{sid}")


def test_streams_interleave_and_sessions_stay_on_their_worker(server):
    """A long propagation on one worker: a prompt on another session of that worker, and a short
    propagation, are answered between its frames; a session made meanwhile goes to the idle
    worker and every call of it stays there."""
    long_id, short_id = open_session(server, clip(40)), open_session(server, clip(4))
    assert long_id[:8] == short_id[:8]  # one worker
    for sid in (long_id, short_id):
        call(server, "POST", f"/{sid}/prompts", POINT)
    stream = call(server, "POST", f"/{long_id}/propagate", {}, stream=True)
    long_lines = stream.iter_lines()
    assert json.loads(next(long_lines))["frame_index"] == 0
    t0 = time.monotonic()
    prompt = call(server, "POST", f"/{short_id}/prompts", {**POINT, "points": [[10, 10]]})
    short = lines(call(server, "POST", f"/{short_id}/propagate", {}, stream=True))
    between = time.monotonic() - t0
    assert prompt.status_code == 200 and short[-1]["frames"] == 4
    assert call(server, "GET", f"/{long_id}").json()["propagating"]  # the long one still runs
    other = open_session(server, clip(3))  # the long stream's worker is busy: the other one takes it
    assert other[:8] != long_id[:8]
    workers = {call(server, "GET", f"/{sid}").json()["worker"] for sid in (other, other, other)}
    assert len(workers) == 1 and workers != {call(server, "GET", f"/{long_id}").json()["worker"]}
    rest = [json.loads(x) for x in long_lines if x]
    assert rest[-1]["frames"] == 40 and rest[-1]["seconds"] > between
    for sid in (long_id, short_id, other):
        call(server, "DELETE", f"/{sid}")


def test_a_client_that_leaves_stops_its_stream_within_a_frame(server):
    sid = open_session(server, clip(40))
    call(server, "POST", f"/{sid}/prompts", POINT)
    r = call(server, "POST", f"/{sid}/propagate", {}, stream=True)
    it = r.iter_lines()
    seen = [json.loads(next(it)) for _ in range(2)]
    r.close()  # the client goes away after two frames
    left = time.monotonic()
    while True:
        last = call(server, "GET", f"/{sid}").json()["last_propagation"]
        if last["ended"] is not None or time.monotonic() - left > 30:
            break
    assert last["ended"] == "withdrawn", last
    # frames the worker computed: the two read, those in flight when the client left, at most one more
    assert len(seen) <= last["frames"] <= len(seen) + 3, last
    assert call(server, "POST", f"/{sid}/prompts", POINT).status_code == 200  # usable again
    call(server, "DELETE", f"/{sid}")


def test_a_session_whose_worker_died_is_lost(server):
    sid = open_session(server, clip(3))
    worker = call(server, "GET", f"/{sid}").json()["worker"]
    pid = next(w["pid"] for w in worker_stats(server) if w["worker"] == worker)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (r := call(server, "GET", f"/{sid}")).status_code != 410 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert r.status_code == 410 and r.json()["error"]["code"] == "session_lost", r.text
    assert "start a new session" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def lazy_server(tmp_path_factory, checkpoint):
    """One worker, ``load: lazy``, two models on the same weights: the default and ``other.pt``."""
    tmp = tmp_path_factory.mktemp("sam2-video-lazy")
    models = []
    for name in ("default", "other"):
        path = tmp / f"{name}.pt"
        path.write_bytes(checkpoint.read_bytes())
        models.append({"name": f"sam2.1_hiera_t_{name}", "weights": str(path), "arch_config": str(ARCH)})
    config = {"sam2": {"load": "lazy", "models": models}}
    proc = ServerProcess(config, tmp, ["--api-key", KEYS[0]], {"OMP_NUM_THREADS": "1"})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_session_calls_load_only_the_sessions_model(lazy_server):
    """Under ``load: lazy`` a session opened on a model other than the default is prompted,
    propagated, described and closed without the default ever being loaded."""

    def loaded() -> list[str]:
        info = requests.get(f"{lazy_server.url}/info", headers=AUTH, timeout=30).json()
        return [m for w in info["families"]["sam2"]["workers"] for m in w["models_loaded"]]

    assert loaded() == []
    r = call(
        lazy_server,
        "POST",
        "",
        {"frames": [b64(f) for f in clip(3)], "checkpoint_path": "sam2.1_hiera_t_other.pt"},
    )
    assert r.status_code == 201, r.text
    sid, model = r.json()["session_id"], r.json()["model"]
    assert loaded() == [model] and "other" in model
    assert call(lazy_server, "POST", f"/{sid}/prompts", POINT).status_code == 200
    parts = lines(call(lazy_server, "POST", f"/{sid}/propagate", {}, stream=True))
    assert [p.get("frame_index") for p in parts[:-1]] == [0, 1, 2] and parts[-1]["done"]
    assert call(lazy_server, "GET", f"/{sid}").status_code == 200
    assert call(lazy_server, "DELETE", f"/{sid}").status_code == 204
    assert loaded() == [model]
