"""Fixtures: tiny real models with weights saved to local files, and the real server as a subprocess."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image
from xdist.scheduler import LoadScopeScheduling

ROOT = Path(__file__).resolve().parents[1]
CLIP_ARCH = ROOT / "configs" / "models" / "clip-tiny.json"
KEYS = ("test-key-one", "test-key-two")


# Under pytest-xdist (``-n 2`` in pyproject's addopts) each test file runs whole on one worker,
# so its module-scoped servers start once; the files that share a session server go together.
SESSION_SERVER_FILES = {
    "clip_server": ("test_auth_and_errors", "test_clip_http"),
    "demo_server": (
        "test_family_health",
        "test_folder_commands",
        "test_http_process",
        "test_null_fields",
        "test_openapi_answers",
        "test_openapi_security",
        "test_playground",
    ),
}
_FILE_GROUP = {file: server for server, files in SESSION_SERVER_FILES.items() for file in files}


class ByFileAndSessionServer(LoadScopeScheduling):
    """xdist's per-scope scheduling with a file as the scope, and one scope for all the files of
    a session server. (``--dist loadgroup`` would do it with marks, but xdist 3.8 writes the
    group into ``item._nodeid``, which pytest 9.2 no longer reads.)"""

    def _split_scope(self, nodeid: str) -> str:
        file = nodeid.split("::", 1)[0]
        return _FILE_GROUP.get(Path(file).stem, file)


def pytest_xdist_make_scheduler(config: pytest.Config, log) -> ByFileAndSessionServer:
    return ByFileAndSessionServer(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A new file on a session server must be listed above, or a second worker would start
    that server again."""
    for item in items:
        for server, files in SESSION_SERVER_FILES.items():
            if server in item.fixturenames and item.path.stem not in files:
                raise pytest.UsageError(f"{item.path.name} uses {server}: add it to SESSION_SERVER_FILES")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python app.py`` in a subprocess, its log in a file, stopped with SIGTERM; ``prefix`` runs
    it under another command (``unshare ...``)."""

    def __init__(
        self,
        config: dict | None,
        tmp: Path,
        args: list[str] = (),
        env: dict | None = None,
        prefix: list[str] = (),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        cmd = [
            *prefix,
            sys.executable,
            str(ROOT / "app.py"),
            "--port",
            str(self.port),
            "--log-level",
            "info",
            *args,
        ]
        if config is not None:
            cfg_path = tmp / f"config-{self.port}.yaml"
            cfg_path.write_text(yaml.safe_dump(config))
            cmd += ["--config", str(cfg_path)]
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def make_clip_checkpoint(path: Path, seed: int = 0) -> Path:
    """Tiny open_clip model with seeded random weights, saved as a plain state dict."""
    import open_clip
    import torch

    open_clip.add_model_config(CLIP_ARCH)
    torch.manual_seed(seed)
    model = open_clip.create_model("clip-tiny", pretrained=None)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def clip_checkpoint(assets) -> Path:
    return make_clip_checkpoint(assets / "clip-tiny.pt")


@pytest.fixture(scope="session")
def image_root(assets) -> Path:
    root = assets / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(root / "photo.png")
    return root


@pytest.fixture(scope="session")
def image_host(image_root):
    """A local HTTP server for image_url tests (loopback only, allow-listed explicitly)."""
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(image_root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def clip_config(checkpoint: Path, image_root: Path) -> dict:
    return {
        "limits": {
            "max_body_bytes": 2 * 1024 * 1024,
            "max_image_pixels": 4_000_000,
            "max_response_bytes": 8 * 1024 * 1024,
        },
        "inputs": {
            "url": {"enabled": True, "allowed_hosts": ["127.0.0.1"]},
            "path": {"roots": [str(image_root)]},
        },
        "clip": {
            "load": "eager",
            "max_batch_size": 16,
            "batch_timeout": 0.05,
            "models": [
                {
                    "name": "clip-tiny",
                    "pretrained": "testfile",
                    "weights": str(checkpoint),
                    "arch_config": str(CLIP_ARCH),
                    "aliases": [["tiny-clip", "test-file"]],
                },
                {
                    "name": "clip-tiny",
                    "pretrained": "random",
                    "weights": "random",
                    "arch_config": str(CLIP_ARCH),
                },
            ],
        },
    }


@pytest.fixture(scope="session")
def clip_server(tmp_path_factory, clip_checkpoint, image_root):
    tmp = tmp_path_factory.mktemp("clip-server")
    server = ServerProcess(
        clip_config(clip_checkpoint, image_root), tmp, ["--api-key", KEYS[0], "--api-key", KEYS[1]]
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture
def clip_url(clip_server) -> str:
    return clip_server.url + "/clip"


@pytest.fixture(scope="session")
def rgb_image() -> Image.Image:
    """Non-square, and neither side a multiple of the 14-px patch."""
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """``configs/demo.yaml`` (every family, tiny random weights) with the key ``KEYS[0]``: one
    server for the files that only read answers (OpenAPI schemas, null fields, the playground)."""
    proc = ServerProcess(
        None,
        tmp_path_factory.mktemp("demo"),
        ["--config", str(ROOT / "configs" / "demo.yaml"), "--api-key", KEYS[0]],
    )
    try:
        yield proc.wait_ready(600)  # every family's workers; a busy two-core machine took 266 s
    finally:
        proc.stop()
