"""SAM 2 video sessions over HTTP: the wire (NDJSON streams, masks, ids, errors), sessions pinned
to their worker, streams that interleave and stop when their client leaves.

One server with two workers on the tiny SAM 2.1 serves the module; the references run sam2's own
``SAM2VideoPredictor`` in this process on the same checkpoint and the same JPEG frames. The maths
of the session (box and mask prompts, backward, live memory) is tested on its own in
tests/test_sam2_video.py; here every answer travels through the server.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pybase64
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco_mask

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
def checkpoint(tmp_path_factory):
    from sam2.build_sam import build_sam2_video_predictor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam2-video") / "sam2-tiny.pt"
    model = build_sam2_video_predictor(
        SPEC["config"], None, device="cpu", hydra_overrides_extra=SPEC["overrides"]
    )
    torch.save({"model": model.state_dict()}, path)
    return path


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
def reference(checkpoint, tmp_path_factory):
    """sam2's own predictor on the same checkpoint: masks per frame for a clip and prompts. Its
    hole filling runs on the CPU here as in the server (sam2 skips it without its CUDA kernel)."""
    from sam2.build_sam import build_sam2_video_predictor

    from apis.sam2.model import install_cpu_connected_components

    install_cpu_connected_components()

    predictor = build_sam2_video_predictor(
        SPEC["config"], str(checkpoint), device="cpu", hydra_overrides_extra=SPEC["overrides"]
    )

    def run(frames: list[bytes], prompts: list[dict], **propagate) -> dict[int, dict[int, np.ndarray]]:
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
            )
        return {
            t: {int(o): (logits[i, 0] > 0).numpy() for i, o in enumerate(ids)}
            for t, ids, logits in predictor.propagate_in_video(state, **propagate)
        }

    return run


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
