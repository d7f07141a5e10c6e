"""Weights from the Hugging Face hub, through the libraries' real download code, without internet.

A fake hub on loopback (``HF_ENDPOINT``) answers the two calls ``hf_hub_download`` makes, HEAD
then GET on ``/{repo}/resolve/{revision}/{file}``, with the headers it needs (``X-Repo-Commit``,
``ETag``, sizes) and the hub's error codes (``GatedRepo``, ``RepoNotFound``, ``EntryNotFound``).
It holds tiny checkpoints under the released repo ids and file names, so open_clip (pretrained
tag ``openai``), timm (``hf_hub_id``), sam2 (``facebook/sam2.1-hiera-tiny``), sam3
(``facebook/sam3``) and RMBG (``hf://briaai/...``) fetch them as they would the real ones; the
configs shrink the architectures with ``arch_config``.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import open_clip
import pytest
import requests
import torch

from clients.clip_client import encode_clip_text_decoded
from tests.conftest import CLIP_ARCH, ROOT, ServerProcess, free_port, make_clip_checkpoint

COMMIT = "4c1f1e5a9b7d3c2e8f6a0b1d2c3e4f5a6b7c8d9e"
SAM2_ARCH = ROOT / "configs" / "models" / "sam2-tiny.json"
SAM3_ARCH = ROOT / "configs" / "models" / "sam3-tiny.json"
DINO_ARCH = ROOT / "configs" / "models" / "dino-tiny.json"
KEY = "hub-test-key"


class FakeHub:
    """The resolve endpoint of the hub, on loopback. ``files`` maps 'org/repo/path' to bytes."""

    def __init__(self, files: dict[str, bytes], gated: tuple[str, ...] = ()):
        self.files = files
        self.gated = set(gated)
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _answer(self, h: http.server.BaseHTTPRequestHandler, body: bool) -> None:
        path = urllib.parse.unquote(h.path.split("?", 1)[0])
        self.requests.append((h.command, path))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo, file = (m.group(1), m.group(3)) if m else ("", "")
        data = self.files.get(f"{repo}/{file}")
        if repo in self.gated:
            self._error(
                h, 403, "GatedRepo", f"Access to model {repo} is restricted. You must have access to it."
            )
        elif not any(k.startswith(repo + "/") for k in self.files) or not m:
            self._error(h, 401, "RepoNotFound", "Repository not found")
        elif data is None:
            self._error(h, 404, "EntryNotFound", f"{file} does not exist on main")
        else:
            h.send_response(200)
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Content-Type", "application/octet-stream")
            h.end_headers()
            if body:
                h.wfile.write(data)

    @staticmethod
    def _error(h, status: int, code: str, message: str) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def downloaded(self) -> set[str]:
        """'org/repo/file' of every file sent in full."""
        return {re.sub(r"^/([^/]+/[^/]+)/resolve/[^/]+/", r"\1/", p) for m, p in self.requests if m == "GET"}

    def close(self) -> None:
        self.httpd.shutdown()


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory) -> dict[str, bytes]:
    """Tiny checkpoints in the released repos, file names and layouts."""
    import safetensors.torch
    import timm
    from sam2.build_sam import build_sam2

    from apis.rmbg.model import tiny_onnx
    from apis.sam3 import internals as sam3_internals
    from apis.sam3.model import Sam3Arch, build_sam3_image

    tmp = tmp_path_factory.mktemp("hub-files")
    files = {
        "timm/vit_base_patch32_clip_224.openai/open_clip_pytorch_model.bin": make_clip_checkpoint(
            tmp / "clip.bin", seed=3
        ).read_bytes()
    }
    files["openclip-test/tiny-clip/open_clip_pytorch_model.bin"] = make_clip_checkpoint(
        tmp / "hub.bin", seed=4
    ).read_bytes()
    files["openclip-test/tiny-clip/open_clip_config.json"] = json.dumps(
        {"model_cfg": json.loads(CLIP_ARCH.read_text()), "preprocess_cfg": {}}
    ).encode()
    torch.manual_seed(0)
    dino = json.loads(DINO_ARCH.read_text())
    model = timm.create_model(dino.pop("architecture"), pretrained=False, num_classes=0, **dino)
    files["timm/vit_small_patch14_dinov2.lvd142m/model.safetensors"] = safetensors.torch.save(
        {k: v.contiguous() for k, v in model.state_dict().items()}
    )
    spec = json.loads(SAM2_ARCH.read_text())
    sam2 = build_sam2(spec["config"], None, device="cpu", hydra_overrides_extra=spec["overrides"])
    files["facebook/sam2.1-hiera-tiny/sam2.1_hiera_tiny.pt"] = _torch_bytes({"model": sam2.state_dict()})
    sam3 = build_sam3_image(Sam3Arch.from_json(SAM3_ARCH))
    sam3_internals.init_untrained(sam3)
    files["facebook/sam3/config.json"] = b"{}"
    files["facebook/sam3/sam3.pt"] = _torch_bytes(
        {"model": {f"detector.{k}": v for k, v in sam3.state_dict().items()}}
    )
    onnx = tiny_onnx(size=64)
    files["briaai/RMBG-1.4/onnx/model.onnx"] = onnx
    files["briaai/RMBG-2.0/onnx/model.onnx"] = onnx
    return files


def hub_config(tmp: Path) -> dict:
    """Released names (so the libraries pick the released repos), tiny architectures."""
    clip_arch = tmp / "ViT-B-32.json"  # open_clip names an added config by its file name
    shutil.copy(CLIP_ARCH, clip_arch)
    return {
        "clip": {
            "models": [
                {"name": "ViT-B-32", "pretrained": "openai", "arch_config": str(clip_arch)},
                {
                    "name": "hf-hub:openclip-test/tiny-clip",
                    "pretrained": "hub",
                },  # open_clip reads the arch there
            ]
        },
        "dino": {"models": [{"name": "dinov2_vits14", "arch_config": str(DINO_ARCH)}]},
        "sam2": {"models": [{"name": "sam2.1_hiera_t", "arch_config": str(SAM2_ARCH)}]},
        "sam3": {"models": [{"name": "sam3", "arch_config": str(SAM3_ARCH)}]},
        "rmbg": {
            "models": [
                {"name": "rmbg-1.4", "weights": "hf://briaai/RMBG-1.4/onnx/model.onnx", "input_size": 64}
            ]
        },
    }


def hub_env(tmp: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return env


def start_app(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), *args],
        env={**full_env, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_app(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return finish(start_app(args, env, cwd))


def released_files(files: dict[str, bytes]) -> set[str]:
    return {k for k in files if "RMBG-2.0" not in k}


def test_download_then_serve_offline(tmp_path, hub_files):
    """--download fetches every file through the libraries' own code; the server then starts with
    HF_HUB_OFFLINE=1 (and no reachable hub) and answers with those weights."""
    hub = FakeHub(hub_files)
    config = hub_config(tmp_path)
    cfg_path = tmp_path / "hub.yaml"
    cfg_path.write_text(json.dumps(config))
    weights = tmp_path / "weights"
    try:
        done = run_app(
            ["--config", str(cfg_path), "--download", "--weights-dir", str(weights)],
            hub_env(tmp_path, hub.url),
            tmp_path,
        )
    finally:
        hub.close()
    assert done.returncode == 0, done.stderr
    assert hub.downloaded() == released_files(hub_files)
    cached = {p.name for p in weights.rglob("*") if p.is_file() and "blobs" not in p.parts}
    assert {
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "sam2.1_hiera_tiny.pt",
        "sam3.pt",
        "model.onnx",
    } <= cached
    for family in ("clip", "dino", "sam2", "sam3", "rmbg"):
        assert f"{family}: weights ready" in done.stderr

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: any hub call would fail
    server = ServerProcess(
        config,
        tmp_path,
        ["--api-key", KEY, "--weights-dir", str(weights)],
        env={**hub_env(tmp_path, dead, offline=True)},
    )
    try:
        server.wait_ready(300)
        info = requests.get(server.url + "/info", headers={"Authorization": f"Bearer {KEY}"}).json()
        sources = {name: fam["models"][0]["weights"] for name, fam in info["families"].items()}
        assert sources["clip"] == "library download of 'openai'"
        assert sources["rmbg"] == "hub file hf://briaai/RMBG-1.4/onnx/model.onnx"
        assert info["random_weights"] is False and info["unavailable"] == {}

        # the CLIP text tower answers with the hub's weights (QuickGELU: open_clip's 'openai' tag)
        open_clip.add_model_config(tmp_path / "ViT-B-32.json")
        for name, pretrained, repo in (
            ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai"),
            ("hf-hub:openclip-test/tiny-clip", "hub", "openclip-test/tiny-clip"),
        ):
            ref_file = tmp_path / "ref.bin"
            ref_file.write_bytes(hub_files[f"{repo}/open_clip_pytorch_model.bin"])
            ref = open_clip.create_model("ViT-B-32", pretrained=str(ref_file), force_quick_gelu=True).eval()
            with torch.no_grad():
                want = ref.encode_text(
                    open_clip.get_tokenizer("ViT-B-32")(["a red bicycle"]), normalize=True
                )[0]
            got = encode_clip_text_decoded(
                "a red bicycle",
                model_name=name,
                model_pretrained=pretrained,
                base_url=server.url + "/clip",
                api_key=KEY,
            )
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
        check_dino_sam2_sam3_rmbg(server, hub_files, tmp_path)
    finally:
        assert server.stop() == 0


def check_dino_sam2_sam3_rmbg(server, hub_files: dict[str, bytes], tmp: Path) -> None:
    """Answers of DINO, SAM 2, SAM 3 and RMBG from the weights the fake hub served, against
    references built from those files directly (timm, SAM2ImagePredictor, Sam3Processor,
    onnxruntime)."""
    import safetensors.torch
    import timm
    from PIL import Image
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    from sam3.model.sam3_image_processor import Sam3Processor

    from apis.sam3.model import Sam3Arch, build_sam3_image
    from clients import dino_client, rmbg_client, sam2_client
    from clients.sam3_client import Sam3ServiceClient
    from tests.http import test_sam3_http
    from tests.http.test_rmbg_http import V14, photo, reference_matte
    from tests.http.test_sam2_http import assert_same_answer, build_tiny, direct, scene

    auth = {"api_key": KEY}
    # DINO: the last block's tokens of a 56x56 image (the native grid: no positional resize)
    image = Image.fromarray(scene(56, 56, seed=3))
    arch = json.loads(DINO_ARCH.read_text())
    model = timm.create_model(arch.pop("architecture"), pretrained=False, num_classes=0, **arch).eval()
    model.load_state_dict(
        safetensors.torch.load(hub_files["timm/vit_small_patch14_dinov2.lvd142m/model.safetensors"])
    )
    x = (np.asarray(image, np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    seen = {}
    model.blocks[-1].register_forward_hook(lambda _m, _i, o: seen.__setitem__("t", o))
    with torch.no_grad():
        model.forward_features(torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None])
    want = seen["t"][0, 1:].reshape(4, 4, -1).numpy()
    got = dino_client.extract_dino_features_decoded(
        image, load_size=None, base_url=server.url + "/dino", **auth
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # SAM 2: a click, against SAM2ImagePredictor on the served checkpoint
    ckpt = tmp / "sam2-ref.pt"
    ckpt.write_bytes(hub_files["facebook/sam2.1-hiera-tiny/sam2.1_hiera_tiny.pt"])
    pred = SAM2ImagePredictor(build_tiny(str(ckpt)))
    s = pred.model.image_size
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    picture = scene(seed=4)
    click = {"point_coords": [[30, 20]], "point_labels": [1]}
    got = sam2_client.generate_sam2_prompt_masks(
        image=sam2_client.encode_image(picture), base_url=server.url + "/sam2", **click, **auth
    )
    assert_same_answer(got, direct(pred, picture, **click))
    # SAM 3: a text prompt, against Sam3Processor on the served checkpoint
    model = build_sam3_image(Sam3Arch.from_json(SAM3_ARCH))
    state = torch.load(io.BytesIO(hub_files["facebook/sam3/sam3.pt"]), weights_only=True)["model"]
    model.load_state_dict({k.removeprefix("detector."): v for k, v in state.items()})
    processor = Sam3Processor(model.eval(), resolution=224, device="cpu")
    picture = test_sam3_http.scene(seed=5)
    got = Sam3ServiceClient(server.url + "/sam3", KEY).predict(
        image=picture, prompts=["tree"], score_threshold=0.0, min_area=0.0
    )
    want = test_sam3_http.reference(processor, picture, "tree", 0.0, 0.02, 0)
    assert want, "threshold 0 keeps instances"
    test_sam3_http.assert_matches(got["results"], want, "tree")
    # RMBG-1.4: the matte, against onnxruntime on the served graph
    onnx_file = tmp / "rmbg-ref.onnx"
    onnx_file.write_bytes(hub_files["briaai/RMBG-1.4/onnx/model.onnx"])
    cut = rmbg_client.remove_background(photo(), base_url=server.url + "/rmbg", **auth)
    want = np.rint(reference_matte(onnx_file, photo(), 64, V14) * 255)
    assert np.abs(np.asarray(cut)[..., 3].astype(int) - want).max() <= 1


def test_server_downloads_at_start_and_leaves_out_an_optional_gated_family(tmp_path, hub_files):
    """No --download: the server fetches what its config needs from the hub at start-up. RMBG-2.0
    is gated and optional here, so the server starts without rmbg and says so."""
    hub = FakeHub(hub_files, gated=("briaai/RMBG-2.0",))
    config = {
        "public_metrics": True,
        "clip": hub_config(tmp_path)["clip"],
        "rmbg": {
            "required": False,
            "models": [{"name": "rmbg-2.0", "weights": "hf://briaai/RMBG-2.0/onnx/model.onnx"}],
        },
    }
    server = ServerProcess(config, tmp_path, ["--api-key", KEY], env=hub_env(tmp_path, hub.url))
    try:
        server.wait_ready(300)
        assert "timm/vit_base_patch32_clip_224.openai/open_clip_pytorch_model.bin" in hub.downloaded()
        health = requests.get(server.url + "/health")
        assert health.status_code == 200
        assert health.text.startswith("ok") and "rmbg" in health.text
        auth = {"Authorization": f"Bearer {KEY}"}
        info = requests.get(server.url + "/info", headers=auth).json()
        assert set(info["families"]) == {"clip"}
        reason = info["unavailable"]["rmbg"]["reason"]
        assert "briaai/RMBG-2.0" in reason and "https://huggingface.co/briaai/RMBG-2.0" in reason
        assert "HF_TOKEN" in reason and "hf auth login" in reason
        h = requests.get(server.url + "/rmbg/health")
        assert h.status_code == 503 and h.json()["status"] == "unavailable"
        r = requests.post(server.url + "/rmbg/remove", json={"image": "x"}, headers=auth)
        assert r.status_code == 501 and r.json()["error"]["code"] == "family_unavailable"
        assert "WILL NOT BE SERVED" in server.log()
        metrics = requests.get(server.url + "/metrics")  # public_metrics: no key needed
        assert metrics.status_code == 200
        assert 'visionserve_family_available{family="rmbg"} 0.0' in metrics.text
        assert 'visionserve_family_available{family="clip"} 1.0' in metrics.text
        assert encode_clip_text_decoded("ok", base_url=server.url + "/clip", api_key=KEY).shape == (32,)
    finally:
        server.stop()
        hub.close()


REFUSALS = {  # id: (gated repos, files removed, the family)
    "gated-403": (("facebook/sam3",), (), "sam3"),
    "missing-file-404": ((), ("facebook/sam3/sam3.pt",), "sam3"),
    "missing-repo-401": ((), ("briaai/RMBG-1.4/onnx/model.onnx", "briaai/RMBG-1.4/x"), "rmbg"),
}


@pytest.fixture(scope="module", autouse=True)
def refused_runs(tmp_path_factory, hub_files) -> dict[str, subprocess.Popen]:
    """Each refusal's app run (and the offline one's), all started with the module (autouse), so
    their seconds of library imports overlap the server tests. Each has a fake hub of its own."""
    hubs, runs = [], {}
    try:
        tmp = tmp_path_factory.mktemp("offline")
        cfg_path = tmp / "sam2.yaml"
        cfg_path.write_text(json.dumps({"sam2": hub_config(tmp)["sam2"]}))
        env = hub_env(tmp, "http://127.0.0.1:9", offline=True)
        runs["offline"] = start_app(["--config", str(cfg_path), "--api-key", KEY], env, tmp)
        for case, (gated, files_removed, family) in REFUSALS.items():
            tmp = tmp_path_factory.mktemp(case)
            hubs.append(FakeHub({k: v for k, v in hub_files.items() if k not in files_removed}, gated=gated))
            cfg_path = tmp / "one.yaml"
            cfg_path.write_text(json.dumps({family: hub_config(tmp)[family]}))
            runs[case] = start_app(
                ["--config", str(cfg_path), "--api-key", KEY], hub_env(tmp, hubs[-1].url), tmp
            )
        yield runs
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for hub in hubs:
            hub.close()


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("gated-403", ["gated", "facebook/sam3", "https://huggingface.co/facebook/sam3"]),
        ("missing-file-404", ["has no file", "facebook/sam3", "sam3.pt"]),
        ("missing-repo-401", ["briaai/RMBG-1.4", "401/404"]),
    ],
    ids=list(REFUSALS),
)
def test_hub_refusals_are_one_plain_message(refused_runs, case, expect):
    """A required family whose weights the hub refuses: exit 1 with a sentence naming the family,
    the repo, the licence page and the token, and no traceback."""
    family = REFUSALS[case][2]
    done = finish(refused_runs[case])
    assert done.returncode == 1
    err = done.stderr
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if f"{family} model" in ln)
    for word in expect:
        assert word in line
    assert "HF_TOKEN" in line and "hf auth login" in line and "https://huggingface.co/" in line
    assert "startup failed" in err


def test_offline_without_the_files_says_to_download_first(refused_runs):
    done = finish(refused_runs["offline"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "facebook/sam2.1-hiera-tiny" in done.stderr and "python app.py --download" in done.stderr


def test_messages_name_the_repo_each_library_downloads_from():
    """Errors without a URL (offline, or wrapped by the library) still name the released repo."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from apis.config import load_config
    from apis.downloads import explain

    cfg = load_config(ROOT / "configs" / "default.yaml")
    repos = {
        "clip": "timm/vit_large_patch14_clip_336.openai",
        "dino": "timm/vit_large_patch14_dinov2.lvd142m",
        "sam2": "facebook/sam2.1-hiera-large",
        "sam3": "facebook/sam3",
        "rmbg": "briaai/RMBG-2.0",
    }
    for family, repo in repos.items():
        try:  # open_clip re-raises the hub's error as a FileNotFoundError
            raise FileNotFoundError("Failed to download file") from LocalEntryNotFoundError("offline")
        except FileNotFoundError as e:
            text = explain(e, family, getattr(cfg, family).models[0])
        assert f"{family} model" in text and f"{repo} is not in the hub cache" in text
        assert f"https://huggingface.co/{repo}" in text and "python app.py --download" in text
