"""The server as containers run it: PID 1 of its PID namespace (no init process), and a server
killed with SIGKILL leaves no process behind (model workers, LitServe's manager)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import open_clip
import psutil
import pytest
import requests
import torch
import torch.nn.functional as F

from clients import clip_client as cc
from tests.conftest import CLIP_ARCH, KEYS, ServerProcess, clip_config

TEXT = "a photo of a robot arm"


def unshare_prefix() -> list[str]:
    """A command prefix that runs the server as PID 1 of a new PID namespace with its own /proc,
    as root or through a user namespace; skip where neither is permitted."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    base = ["unshare", "--pid", "--fork", "--mount-proc"]
    for prefix in (base, ["unshare", "--user", "--map-root-user", *base[1:]]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("this machine permits no new PID namespace (unshare --pid, also with --user)")


def living(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def reference_text(checkpoint, text: str) -> np.ndarray:
    open_clip.add_model_config(CLIP_ARCH)
    model = open_clip.create_model("clip-tiny", pretrained=str(checkpoint)).eval()
    with torch.no_grad():
        e = model.encode_text(open_clip.get_tokenizer("clip-tiny")([text]))
    return F.normalize(e, dim=-1)[0].numpy()


def test_serves_as_pid_1_and_stops_cleanly_on_sigterm(tmp_path, clip_checkpoint, image_root):
    prefix = unshare_prefix()
    server = ServerProcess(
        clip_config(clip_checkpoint, image_root), tmp_path, ["--api-key", KEYS[0]], prefix=prefix
    )
    try:
        server.wait_ready()
        (main,) = psutil.Process(server.proc.pid).children()  # unshare's child: the server
        nspid = next(
            line
            for line in Path(f"/proc/{main.pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        )
        assert nspid.split()[-1] == "1", nspid  # its pid in its own namespace
        emb = cc.encode_clip_text_decoded(
            TEXT,
            base_url=server.url + "/clip",
            api_key=KEYS[0],
            model_name="clip-tiny",
            model_pretrained="testfile",
        )
        np.testing.assert_allclose(emb, reference_text(clip_checkpoint, TEXT), rtol=1e-4, atol=1e-5)
        # spawned children: the model worker (torch mapped) and LitServe's small manager
        workers = [p for p in main.children() if "libtorch" in Path(f"/proc/{p.pid}/maps").read_text()]
        assert len(workers) == 1 and workers[0].ppid() == main.pid
        # PID 1 gets only the signals it handles: SIGTERM must still drain and stop it
        main.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop()


def test_a_sigkilled_server_leaves_no_process_behind(tmp_path, clip_checkpoint, image_root):
    server = ServerProcess(clip_config(clip_checkpoint, image_root), tmp_path, ["--api-key", KEYS[0]])
    tree: list[psutil.Process] = []
    try:
        server.wait_ready()
        main = psutil.Process(server.proc.pid)
        auth = {"Authorization": f"Bearer {KEYS[0]}"}

        def worker_pid() -> int:
            return requests.get(server.url + "/info", headers=auth).json()["families"]["clip"]["workers"][0][
                "pid"
            ]

        # a worker LitServe restarts is started by its monitor thread, not the main thread (the
        # kernel's parent-death signal follows the thread): it must die with the server too
        first = worker_pid()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 180  # a new worker imports torch and loads the models again
        while time.monotonic() < deadline:
            if requests.get(server.url + "/clip/health").status_code == 200 and worker_pid() != first:
                break
            time.sleep(0.1)
        restarted = psutil.Process(worker_pid())
        assert restarted.pid != first and restarted.ppid() == main.pid, server.log()
        tree = main.children(recursive=True)
        assert restarted in tree and len(tree) >= 2  # the worker and LitServe's manager, at least
        main.kill()
        deadline = time.monotonic() + 10
        while living(tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not living(tree), [" ".join(p.cmdline()) for p in living(tree)]
    finally:
        for p in living(tree):
            p.kill()
        server.stop()
