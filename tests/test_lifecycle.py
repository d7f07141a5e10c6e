"""Start-up and shut-down: generated key, --no-auth, inputs off by default, bad checkpoint, SIGTERM."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import requests

from clients import VisionServeError
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
        pids = [w["pid"] for w in info["families"]["clip"]["workers"]]
        assert pids and all(alive(p) for p in pids)
    finally:
        t0 = time.monotonic()
        code = server.stop(timeout=10)
    assert time.monotonic() - t0 < 10 and code == 0, server.log()
    time.sleep(0.5)
    assert not any(alive(p) for p in pids), "orphaned worker processes"
    assert port_free(server.port)


def test_no_auth_serves_without_key_and_says_so(tmp_path):
    server = ServerProcess(None, tmp_path, ["--config", str(DEMO), "--no-auth"]).wait_ready()
    try:
        r = requests.post(server.url + "/clip/encode_text", json={"text": "x"})
        assert r.status_code == 200 and r.json()["shape"] == [32]
        assert requests.get(server.url + "/info").json()["auth"] == "disabled"
        assert "AUTH DISABLED" in server.log()
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
