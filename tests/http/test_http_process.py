"""The HTTP process runs no model, so it loads no model library: torch, torchvision (pulled in by
open_clip, timm, sam2 and sam3) and onnxruntime stay in the workers (apis/core/lazy.py), and the
server's helper processes stay small. A worker loads only what its family uses: triton only for
SAM 3, NVIDIA's CUDA bindings only on a GPU (apis/core/process.py, ``block_imports``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from clients import encode_image
from tests.conftest import KEYS

IMAGE = encode_image(np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8))
BODIES = {  # one request per family, through each HTTP-side hook (check, check_image, read_inputs)
    "/clip/encode_text": {"text": "a cat"},
    "/clip/classify": {"image": IMAGE, "labels": ["cat", "dog"]},
    "/dino/embed": {"images": [IMAGE]},
    "/sam2/prompt_mask": {"image": IMAGE, "point_coords": [[10, 10]], "point_labels": [1]},
    "/sam3/predict": {"image": IMAGE, "prompts": ["cat"]},
    "/rmbg/remove": {"image": IMAGE},
}


def shared_objects(pid: int) -> set[str]:
    """Paths of the shared libraries mapped into process ``pid``."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if ".so" in line}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_the_http_process_loads_no_model_library_while_the_workers_do(demo_server):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    for route, body in BODIES.items():
        r = requests.post(demo_server.url + route, json=body, headers=auth, timeout=120)
        assert r.status_code == 200, (route, r.text[:300])
    info = requests.get(demo_server.url + "/info", headers=auth).json()
    workers = {name: fam["workers"][0]["pid"] for name, fam in info["families"].items()}

    def loads(pid: int, package: str) -> bool:
        return any(f"/site-packages/{package}/" in path for path in shared_objects(pid))

    http = demo_server.proc.pid
    assert not any(loads(http, p) for p in ("torch", "torchvision", "onnxruntime", "cv2"))
    # the check can see them: each model-running worker has its library's extension mapped
    assert all(loads(workers[f], "torch") for f in ("clip", "dino", "sam2", "sam3", "rmbg"))
    assert all(loads(workers[f], "torchvision") for f in ("clip", "dino", "sam2", "sam3"))
    assert loads(workers["rmbg"], "onnxruntime")
    # every process but the workers is small: the HTTP process, LitServe's manager (spawned, not
    # forked from the HTTP process: apis/litserve_internals.py) and Python's resource tracker
    helpers = set(children(http)) - set(workers.values())
    assert len(helpers) == 2, helpers
    assert rss_mb(http) < 150, rss_mb(http)
    assert all(rss_mb(pid) < 40 and not loads(pid, "torch") for pid in helpers), {
        p: rss_mb(p) for p in helpers
    }


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_only_the_sam3_worker_loads_triton_and_cpu_workers_no_cuda_bindings(demo_server):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    for route, body in BODIES.items():  # every family still answers without what it was denied
        r = requests.post(demo_server.url + route, json=body, headers=auth, timeout=120)
        assert r.status_code == 200, (route, r.text[:300])
    info = requests.get(demo_server.url + "/info", headers=auth).json()
    workers = {name: fam["workers"][0] for name, fam in info["families"].items()}

    def loads(pid: int, package: str) -> bool:
        return any(f"/site-packages/{package}/" in path for path in shared_objects(pid))

    # torchvision imports torch._dynamo, which imports triton where it is not blocked
    assert loads(workers["sam3"]["pid"], "triton")
    assert not any(loads(workers[f]["pid"], "triton") for f in ("clip", "dino", "sam2", "rmbg"))
    # torch's CUDA build imports NVIDIA's cuda.bindings where installed, unless the worker blocks it
    cpu = [w["pid"] for w in workers.values() if w["device"] == "cpu"]
    assert not any(loads(pid, "cuda") for pid in cpu), cpu


def children(pid: int) -> list[int]:
    """Pids of the processes whose parent is ``pid``."""
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024
