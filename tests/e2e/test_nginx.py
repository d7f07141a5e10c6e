"""Three replicas behind Debian's nginx running deploy/nginx/nginx.conf, and the same three with
the client pool and no load balancer.

One test, one set of processes (they take a minute or two to start): replicas on 127.0.0.1,
127.0.0.2 and 127.0.0.3 (``--host`` takes any address), each serving tiny CLIP and SAM 3 models
with random weights, and nginx in the foreground with a config written to tmp.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import uvicorn
from PIL import Image

from apis.core.settings import Limits
from clients import encode_image
from clients.sam3_client import Sam3ServicePool
from tests.conftest import ROOT, ServerProcess, free_port

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
SERVER_LINE = "server visionserve:8000 max_fails=1 fail_timeout=10s;"
KEY = "nginx-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
CONFIG = {
    "clip": {
        "max_batch_size": 8,
        "models": [
            {
                "name": "clip-tiny",
                "pretrained": "random",
                "weights": "random",
                "arch_config": str(ROOT / "configs" / "models" / "clip-tiny.json"),
            }
        ],
    },
    "sam3": {
        "max_batch_size": 4,
        "models": [
            {
                "name": "sam3-tiny",
                "weights": "random",
                "arch_config": str(ROOT / "configs/models/sam3-tiny.json"),
            }
        ],
    },
}
LOG_LINE = re.compile(  # the `upstreams` log_format of deploy/nginx/nginx.conf
    r'"\S+ (?P<path>\S+) [^"]*" (?P<status>\d+) .* '
    r"upstream=(?P<up>.*) ustatus=(?P<us>.*) image_key=(?P<key>\S*)$"
)


def nginx_binary() -> str:
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if path is None:
        message = "nginx is not installed (apt-get install -y nginx; scripts/install.sh test does it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must run this test")
        pytest.skip(message)
    return path


def render_nginx_conf(upstreams: list[str], port: int, tmp: Path) -> str:
    """deploy/nginx/nginx.conf with loopback replicas, a loopback port and every path in tmp."""
    text = NGINX_CONF.read_text()
    assert text.count(SERVER_LINE) == 2 and "listen 8080;" in text
    servers = "\n        ".join(SERVER_LINE.replace("visionserve:8000", u) for u in upstreams)
    text = text.replace(SERVER_LINE, servers).replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("access_log /dev/stdout", f"access_log {tmp}/access.log")
    text = text.replace("error_log /dev/stderr", f"error_log {tmp}/error.log")
    temp_paths = "".join(
        f"\n    {kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return text.replace("http {", "http {" + temp_paths, 1)


class Nginx:
    """nginx in the foreground (no system service), its config, pid and logs in ``tmp``."""

    def __init__(self, upstreams: list[str], tmp: Path):
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = tmp / "nginx.conf"
        conf.write_text(render_nginx_conf(upstreams, self.port, tmp))
        # As root the workers would run as nobody, who cannot enter pytest's private tmp dirs.
        main = f"daemon off; pid {tmp}/nginx.pid;" + (" user root;" if os.geteuid() == 0 else "")
        cmd = [nginx_binary(), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf), "-g", main]
        check = subprocess.run([*cmd, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.url + "/health", timeout=2)
                break
            except requests.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.error_log()
                time.sleep(0.1)

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text() if path.exists() else ""

    def access(self) -> list[dict]:
        """Access log rows: path, status, the replicas tried (``up``) and their statuses (``us``)."""
        rows = []
        for line in (self.tmp / "access.log").read_text().splitlines():
            m = LOG_LINE.search(line)
            assert m, line
            row = m.groupdict()
            row["up"] = [u.strip() for u in re.split(r"[,:]\s", row["up"])] if row["up"] != "-" else []
            row["us"] = [s.strip() for s in re.split(r"[,:]\s", row["us"])] if row["us"] != "-" else []
            rows.append(row)
        return rows

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40 + seed, 52, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sam3_request(base: str, data: bytes, prompt: str) -> requests.Response:
    """A raw /sam3/predict with the routing header the clients send (sha256 of the file bytes)."""
    headers = {**AUTH, "X-Image-Key": hashlib.sha256(data).hexdigest()}
    body = {
        "image": base64.b64encode(data).decode(),
        "prompts": [prompt],
        "score_threshold": 0,
        "min_area": 0,
    }
    return requests.post(base + "/sam3/predict", json=body, headers=headers, timeout=120)


def info(server: ServerProcess) -> dict:
    return requests.get(server.url + "/info", headers=AUTH, timeout=10).json()["families"]


def clip_served(server: ServerProcess) -> int:
    return sum(info(server)["clip"]["requests"].get("encode_text", {}).values())


def sam3_encodings(server: ServerProcess) -> int:
    return sum(n for w in info(server)["sam3"]["workers"] for n in w["encoded_images"].values())


@pytest.fixture
def cluster(tmp_path):
    nginx_binary()  # skip before starting anything
    replicas = []
    for host in HOSTS:
        server = ServerProcess(CONFIG, tmp_path, ["--api-key", KEY, "--host", host, "--drain-timeout", "120"])
        server.url = f"http://{host}:{server.port}"
        replicas.append(server)
    nginx = None
    try:
        for server in replicas:
            server.wait_ready(300)
        (tmp_path / "nginx").mkdir()
        nginx = Nginx([s.url.removeprefix("http://") for s in replicas], tmp_path / "nginx")
        yield nginx, replicas
    finally:
        if nginx is not None:
            nginx.stop()
        for server in replicas:
            server.stop()


def test_round_robin_image_affinity_crash_and_graceful_stop(cluster):
    nginx, replicas = cluster
    addr = [s.url.removeprefix("http://") for s in replicas]

    # 1. Stateless routes go round-robin: 9 requests, 3 per replica.
    texts = [f"text {i}" for i in range(9)]
    direct = requests.post(replicas[0].url + "/clip/encode_text", json={"text": texts[0]}, headers=AUTH)
    for text in texts:
        r = requests.post(nginx.url + "/clip/encode_text", json={"text": text}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        if text == texts[0]:  # the same random weights on every replica: same answer
            assert r.json() == direct.json()
    assert [clip_served(s) for s in replicas] == [4, 3, 3]  # 3 each, plus the direct one
    rows = [r for r in nginx.access() if r["path"] == "/clip/encode_text"]
    assert Counter(r["up"][0] for r in rows) == {a: 3 for a in addr}
    print(
        "\nround-robin, CLIP requests per replica:", [clip_served(s) - (s is replicas[0]) for s in replicas]
    )

    # 2. SAM 3 on one image always reaches the same replica: 5 images x 3 prompts, 5 encodings.
    images = [png(seed) for seed in range(5)]
    calls = [(data, prompt) for data in images for prompt in ("cat", "dog", "box")]
    with ThreadPoolExecutor(3) as ex:
        answers = list(ex.map(lambda c: sam3_request(nginx.url, *c), calls))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    encodings = [sam3_encodings(s) for s in replicas]
    assert sum(encodings) == len(images)
    homes: dict[str, set[str]] = {}
    for row in nginx.access():
        if row["path"] == "/sam3/predict":
            homes.setdefault(row["key"], set()).update(row["up"])
    assert sorted(homes) == sorted(hashlib.sha256(d).hexdigest() for d in images)
    assert all(len(h) == 1 for h in homes.values()), homes
    print(f"SAM 3, {len(calls)} requests on {len(images)} images: images encoded per replica {encodings}")

    # 3. Kill replica 1 (SIGKILL, its whole process group) while 4 threads call through nginx (CLIP
    #    and SAM 3) and 2 more call SAM 3 through the client pool with no load balancer.
    victim = replicas[1]
    pool = Sam3ServicePool([s.url + "/sam3" for s in replicas], api_key=KEY)
    served_before = [clip_served(s) for s in replicas]
    at_kill = []  # nginx log rows written, then the time

    def call(i: int) -> tuple[str, bool]:
        if i == 12:
            at_kill.append(len(nginx.access()))
            os.killpg(victim.proc.pid, signal.SIGKILL)
            at_kill.append(time.monotonic())
        if i % 3 == 2:  # the pool, no load balancer
            try:
                pool.predict(image=images[i % 5], prompts=["cat"], score_threshold=0, min_area=0)
                return "pool", True
            except Exception:
                return "pool", False
        if i % 3 == 1:
            r = sam3_request(nginx.url, images[i % 5], "cat")
        else:
            r = requests.post(
                nginx.url + "/clip/encode_text", json={"text": f"t{i}"}, headers=AUTH, timeout=60
            )
        return "nginx", r.status_code == 200

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(call, range(60)))
    seconds_after_kill = time.monotonic() - at_kill[1]
    victim.proc.wait(10)
    failed = Counter(kind for kind, ok in results if not ok)
    after = nginx.access()[at_kill[0] :]
    # tries on the dead replica: in flight when it died, or sent before nginx marked it down
    on_victim = [r for r in after if dict(zip(r["up"], r["us"], strict=False)).get(addr[1], "200") != "200"]
    moved = [r for r in on_victim if r["status"] == "200" and r["up"][-1] != addr[1]]
    print(
        f"kill: {len(results)} calls ({len(after)} through nginx), failed: {sum(failed.values())}; "
        f"nginx tried the dead replica {len(on_victim)} times, all answered by another replica: "
        f"{len(moved) == len(on_victim)}; {seconds_after_kill:.1f} s of load after the kill"
    )
    # Requests in flight on the dead replica are retried on another one (inference has no side
    # effects), by nginx and by the pool alike: none fails.
    assert not failed, results
    assert all(r["status"] == "200" for r in after) and len(moved) == len(on_victim)
    # nginx stops sending to it: up to 4 requests in flight when it died, then one try per
    # fail_timeout (10 s) per upstream group (stateless, images), not 1 in 3 as before.
    assert len(on_victim) <= 4 + 2 * (2 + int(seconds_after_kill // 10)), on_victim
    survivors = [replicas[0], replicas[2]]
    assert sum(clip_served(s) for s in survivors) > sum(served_before[i] for i in (0, 2))

    # 4. SIGTERM replica 2 while a slow request runs on it and nginx keeps calling: the request
    #    finishes, new ones go to replica 0 (503 shutting_down -> nginx retries), nothing fails.
    leaving = replicas[2]
    worker = psutil.Process(info(leaving)["clip"]["workers"][0]["pid"])
    slow = {"image": encode_image(Image.fromarray(np.zeros((600, 800, 3), np.uint8))), "load_size": 1400}
    cpu0 = sum(worker.cpu_times()[:2])
    with ThreadPoolExecutor(4) as ex:
        pending = ex.submit(
            requests.post, leaving.url + "/clip/extract", json=slow, headers=AUTH, timeout=300
        )
        deadline = time.monotonic() + 60
        while sum(worker.cpu_times()[:2]) - cpu0 < 0.3 and time.monotonic() < deadline:
            time.sleep(0.01)
        leaving.proc.send_signal(signal.SIGTERM)
        during = list(
            ex.map(
                lambda i: (
                    requests.post(
                        nginx.url + "/clip/encode_text", json={"text": f"late {i}"}, headers=AUTH, timeout=60
                    ).status_code
                ),
                range(30),
            )
        )
        slow_answer = pending.result()
    assert slow_answer.status_code == 200, slow_answer.text
    assert slow_answer.json()["shape"] == [100, 134, 32]  # 600 x 800 px to 1400 x 1867: 14-px patches
    assert during == [200] * 30
    assert leaving.proc.wait(150) == 0, leaving.log()
    assert re.search(r"SIGTERM: draining [1-9]\d* request", leaving.log()), leaving.log()
    assert "drained in" in leaving.log()
    print(
        f"SIGTERM under load: the request in flight answered {slow_answer.status_code}, "
        f"{during.count(200)}/{len(during)} nginx requests answered, exit code {leaving.proc.returncode}; "
        + re.search(r"drained in [\d.]+ s", leaving.log()).group()
    )
    last = requests.post(nginx.url + "/clip/encode_text", json={"text": texts[0]}, headers=AUTH, timeout=60)
    assert last.status_code == 200 and last.json() == direct.json()  # replica 0 answers alone

    # 5. Bodies over the limits get the JSON 413: the replica's past its limit, nginx's past its own.
    check_body_limits(nginx.url)


def check_body_limits(url: str) -> None:
    """A body just over the replicas' limit reaches them and gets their JSON 413 (naming their
    limit), not nginx's HTML page; a body over nginx's limit gets nginx's 413 in the same shape."""
    over_server = Limits().max_body_bytes + 2**20
    r = requests.post(
        url + "/clip/encode_text",
        data=b" " * over_server,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "body_too_large"
    assert f"limit of {Limits().max_body_bytes} bytes" in r.json()["error"]["message"]
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(  # declared, never sent: nginx answers from the header
            f"POST /clip/encode_text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {nginx_body_limit() + 1}\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, answer
    error = json.loads(body)["error"]
    assert error["code"] == "body_too_large" and error["type"] == "request_too_large", error
    assert f"limit of {nginx_body_limit() // 2**20} MiB" in error["message"]


def nginx_body_limit() -> int:
    (size,) = re.findall(r"^\s*client_max_body_size (\d+)m;", NGINX_CONF.read_text(), re.M)
    return int(size) * 2**20


def test_nginx_limits_sit_above_the_servers_and_keep_alive_below_uvicorns():
    """The server's JSON 413 (which names its limit) is what a client sees; nginx closes idle
    upstream connections before uvicorn does, so it never reuses one uvicorn has closed."""
    assert nginx_body_limit() > Limits().max_body_bytes
    uvicorn_keep_alive = uvicorn.Config(app=None).timeout_keep_alive  # the server does not change it
    keep_alive = [int(v) for v in re.findall(r"keepalive_timeout (\d+)s;", NGINX_CONF.read_text())]
    assert keep_alive and all(v < uvicorn_keep_alive for v in keep_alive)
