"""Server options that no route test sets, each checked by its effect on one running server:
``--models``, ``--api-key-file``, ``--timeout``, ``--log-level``, ``--accelerator``/``--devices``
on a CPU host, and ``load: lazy``. (``--host`` and ``--port``: test_deploy and test_nginx serve on
the addresses they give; ``--devices`` on GPUs: test_cuda.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from clients.common import encode_image
from tests.conftest import KEYS, ROOT, ServerProcess, clip_config

FILE_KEYS = ("file-key-alpha", "file-key-beta")
QUEUE_TIMEOUT = 0.2  # seconds; the blocking request below takes seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory, clip_checkpoint, image_root):
    tmp = tmp_path_factory.mktemp("options")
    keys = tmp / "keys.txt"
    keys.write_text(f"# deploy keys\n{FILE_KEYS[0]}\n\n  {FILE_KEYS[1]}  # staging\n")
    config = clip_config(clip_checkpoint, image_root)
    config["limits"] |= {"max_tokens": 32768, "max_image_pixels": 8_000_000}
    config["clip"] = {**config["clip"], "load": "lazy", "max_batch_size": 1, "batch_timeout": 0}
    config["dino"] = {  # enabled in the config, not selected by --models
        "models": [
            {
                "name": "dinov2_vits14",
                "weights": "random",
                "arch_config": str(ROOT / "configs/models/dino-tiny.json"),
            }
        ]
    }
    args = ["--models", "clip", "--api-key-file", str(keys), "--timeout", str(QUEUE_TIMEOUT)]
    args += ["--log-level", "debug", "--accelerator", "cpu", "--devices", "2"]  # the last --log-level wins
    proc = ServerProcess(config, tmp, args)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def info(server) -> dict:
    return requests.get(server.url + "/info", headers=auth(FILE_KEYS[0]), timeout=30).json()


def test_lazy_loading_models_and_devices(server):
    """load: lazy loads nothing before the first request and the requested model on it;
    --models clip serves no other family of the config; --accelerator cpu puts the worker on the
    CPU whatever --devices says."""
    before = info(server)
    assert set(before["families"]) == {"clip"} and before["devices"] == ["cpu"]
    clip = before["families"]["clip"]
    assert clip["load"] == "lazy" and [w["device"] for w in clip["workers"]] == ["cpu"]
    assert clip["workers"][0]["models_loaded"] == []
    r = requests.post(server.url + "/clip/encode_text", json={"text": "a cat"}, headers=auth(FILE_KEYS[0]))
    assert r.status_code == 200
    assert info(server)["families"]["clip"]["workers"][0]["models_loaded"] == ["clip-tiny/testfile"]
    r = requests.post(server.url + "/dino/extract", json={"image": "x"}, headers=auth(FILE_KEYS[0]))
    assert r.status_code == 404


def test_keys_from_the_key_file_only(server):
    for key in FILE_KEYS:
        r = requests.post(server.url + "/clip/encode_text", json={"text": "a"}, headers=auth(key))
        assert r.status_code == 200, r.text
    for key in (*KEYS, "# deploy keys", ""):
        r = requests.post(server.url + "/clip/encode_text", json={"text": "a"}, headers=auth(key))
        assert r.status_code == 401, key
    assert "generated" not in server.log()


def test_a_request_queued_past_the_timeout_gets_504_queue_timeout(server):
    """With the only worker busy (batches of 1) for seconds, a request that waits in the queue
    longer than --timeout is answered 504 queue_timeout; the busy one completes."""
    yy, xx = np.mgrid[:2520, :2520]
    big = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)  # compresses
    blocker = {"image": encode_image(big), "load_size": 2520}  # 180 x 180 patches
    requests.post(server.url + "/clip/encode_text", json={"text": "warm"}, headers=auth(FILE_KEYS[0]))

    def block() -> tuple[requests.Response, float]:
        r = requests.post(server.url + "/clip/extract", json=blocker, headers=auth(FILE_KEYS[0]), timeout=300)
        return r, time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(block)
        time.sleep(0.5)  # the blocker is read and on the worker by now
        sent = time.monotonic()
        late = requests.post(server.url + "/clip/encode_text", json={"text": "b"}, headers=auth(FILE_KEYS[1]))
        waited = time.monotonic() - sent
        done, finished = busy.result()
    assert done.status_code == 200, done.text
    assert finished > sent, "the blocker finished before the late request was sent"
    assert waited > QUEUE_TIMEOUT, waited
    assert late.status_code == 504 and late.json()["error"]["code"] == "queue_timeout", late.text


def test_debug_log_level_prints_debug_lines(server):
    assert "clip worker 0 (pid" in server.log() and "connected" in server.log()


def test_keys_never_reach_the_log_at_debug_level(server):
    for key in (*FILE_KEYS, "vs-wrong-key-in-the-log"):
        requests.post(server.url + "/clip/encode_text", json={"text": "a"}, headers=auth(key))
    requests.get(server.url + "/info", headers={"Authorization": f"Basic {FILE_KEYS[0]}"})
    log = server.log()
    assert "connected" in log  # debug lines are there
    for key in FILE_KEYS:
        assert key not in log
