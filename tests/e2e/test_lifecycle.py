"""Start-up and shut-down: generated key, --no-auth, inputs off by default, bad checkpoint, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from clients import VisionServeError, encode_image
from clients import clip_client as cc
from tests.conftest import ROOT, ServerProcess

DEMO = ROOT / "configs" / "demo.yaml"


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def port_free(port: int) -> bool:
    """Whether a new server could listen there (SO_REUSEADDR, as uvicorn does: TIME_WAIT is fine)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_generated_key_demo_config_inputs_off_and_clean_sigterm(tmp_path, rgb_image):
    server = ServerProcess(None, tmp_path, ["--config", str(DEMO)]).wait_ready()
    try:
        key = re.search(r"generated one for this run.*\n\s+(vs-\S+)", server.log()).group(1)
        assert "RANDOM WEIGHTS" in server.log()
        url = server.url + "/clip"
        assert requests.post(url + "/encode_text", json={"text": "x"}).status_code == 401
        emb = cc.encode_clip_text_decoded("x", base_url=url, api_key=key)
        assert emb.shape == (32,)
        for field, value in (("image_url", "http://127.0.0.1/x.png"), ("image_path", "/tmp/x.png")):
            with pytest.raises(VisionServeError) as e:
                cc.extract_clip_features(base_url=url, api_key=key, **{field: value})
            assert e.value.status == 400 and e.value.code == "input_disabled"
            assert f"{field} input is disabled" in e.value.message
        info = requests.get(server.url + "/info", headers={"Authorization": f"Bearer {key}"}).json()
        assert info["random_weights"] is True
        assert info["families"]["clip"]["models"][0]["weights"].startswith("random")
        pids = [w["pid"] for f in info["families"].values() for w in f["workers"]]
        assert len(pids) == 5 and all(alive(p) for p in pids)  # one worker per demo family
    finally:
        code = server.stop(timeout=60)  # past that, SIGKILL: a non-zero code
    assert code == 0, server.log()
    deadline = time.monotonic() + 10  # the server exits as its workers exit: reaping may lag
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids), "orphaned worker processes"
    assert port_free(server.port)


def test_no_auth_and_a_worker_killed_mid_request(tmp_path, rgb_image):
    # CLIP alone of the demo config: the worker killed is a CLIP one (four more families would
    # only add start-up time)
    server = ServerProcess(
        None, tmp_path, ["--config", str(DEMO), "--no-auth", "--models", "clip"]
    ).wait_ready()
    try:
        r = requests.post(server.url + "/clip/encode_text", json={"text": "x"})
        assert r.status_code == 200 and r.json()["shape"] == [32]
        info = requests.get(server.url + "/info").json()
        assert info["auth"] == "disabled" and "AUTH DISABLED" in server.log()
        pid = info["families"]["clip"]["workers"][0]["pid"]
        slow = {"image": encode_image(rgb_image.resize((800, 600))), "load_size": 2000, "ret_pca": True}
        worker = psutil.Process(pid)
        cpu0 = sum(worker.cpu_times()[:2])
        with ThreadPoolExecutor(1) as pool:
            # a dead worker must answer, not hang: the generous timeout only bounds a hang, as a
            # loaded machine may take long to notice the death and answer
            pending = pool.submit(requests.post, server.url + "/clip/extract", json=slow, timeout=180)
            # kill once the worker is busy with it (0.3 CPU-seconds into a ~3 CPU-second request)
            deadline = time.monotonic() + 10
            while sum(worker.cpu_times()[:2]) - cpu0 < 0.3 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            r = pending.result()
        assert r.status_code == 500 and r.json()["error"]["code"] == "worker_died"
        server.wait_ready(180)
        deadline = time.monotonic() + 180  # a new worker imports torch and loads the model again
        while requests.get(server.url + "/clip/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests.get(server.url + "/clip/health").status_code == 200, server.log()
        r = requests.post(server.url + "/clip/encode_text", json={"text": "x"}, timeout=120)
        assert r.status_code == 200 and r.json()["shape"] == [32]
        assert requests.get(server.url + "/info").json()["families"]["clip"]["workers"][0]["pid"] != pid
    finally:
        assert server.stop() == 0


def test_missing_checkpoint_fails_at_startup(tmp_path):
    config = {
        "clip": {
            "models": [
                {
                    "name": "clip-tiny",
                    "pretrained": "mine",
                    "weights": str(tmp_path / "nope.pt"),
                    "arch_config": str(ROOT / "configs/models/clip-tiny.json"),
                }
            ]
        }
    }
    server = ServerProcess(config, tmp_path, ["--api-key", "k"])
    code = server.proc.wait(timeout=120)
    log = server.log()
    server.stop()
    assert code != 0
    assert "nope.pt" in log and "startup failed" in log
