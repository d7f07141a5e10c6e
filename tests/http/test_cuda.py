"""CUDA checks (``pytest -m cuda``; scripts/gpu_check.sh runs them). Skipped without a GPU.

Each family serves its tiny demo model (random, seeded weights: every server computes the same
model) on the GPU in float32, bfloat16 and float16; the reduced precisions must agree with
float32 there. Then two workers on one GPU, ``--devices`` placement and onnxruntime's CUDA
provider.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, ServerProcess

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]
KEY = "cuda-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def demo_config() -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for fam in cfg.values():
        for m in fam.get("models", []) if isinstance(fam, dict) else []:
            if m.get("arch_config"):
                m["arch_config"] = str(ROOT / "configs" / m["arch_config"])
    return cfg


def image_b64(seed: int = 0, size: tuple[int, int] = (96, 128)) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tensor(answer: dict, key: str, shape_key: str = "shape") -> np.ndarray:
    return (
        np.frombuffer(base64.b64decode(answer[key]), np.float32).reshape(answer[shape_key]).astype(np.float64)
    )


def run_all(url: str) -> dict[str, np.ndarray]:
    """One request per family; the numbers each answered with, as float64 arrays."""
    img = image_b64()

    def post(path: str, body: dict) -> dict:
        r = requests.post(url + path, json=body, headers=AUTH, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    out = {}
    out["clip"] = tensor(post("/clip/encode_text", {"text": "a red bicycle"}), "text_embedding")
    dino = post("/dino/extract", {"image": img, "facet": "token", "response_format": "json"})
    out["dino"] = tensor(dino, "features")
    sam2 = post("/sam2/prompt_mask", {"image": img, "point_coords": [[40, 30]], "point_labels": [1]})
    out["sam2"] = tensor(sam2, "low_res_masks", "low_res_shape")
    sam3 = post("/sam3/predict", {"image": img, "prompts": ["cat"], "score_threshold": 0.0, "min_area": 0})
    out["sam3"] = np.array([max((r["score"] for r in sam3["results"]), default=0.0)])  # best instance
    rmbg = post("/rmbg/remove", {"image": img, "output": "mask"})
    out["rmbg"] = np.asarray(Image.open(io.BytesIO(base64.b64decode(rmbg["mask"]))), dtype=np.float64) / 255
    return out


def serve(tmp_path, config: dict, *args: str) -> ServerProcess:
    return ServerProcess(config, tmp_path, ["--api-key", KEY, "--accelerator", "cuda", *args]).wait_ready(600)


@pytest.fixture(scope="module")
def float32_answers(tmp_path_factory) -> dict[str, np.ndarray]:
    server = serve(tmp_path_factory.mktemp("f32"), demo_config(), "--devices", "1", "--dtype", "float32")
    try:
        return run_all(server.url)
    finally:
        server.stop()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_family_in_reduced_precision_agrees_with_float32(tmp_path, float32_answers, dtype):
    server = serve(tmp_path, demo_config(), "--devices", "1", "--dtype", dtype)
    try:
        info = requests.get(server.url + "/info", headers=AUTH).json()
        for name, fam in info["families"].items():
            for w in fam["workers"]:
                assert w["device"] == "cuda:0", name
                if name != "rmbg":  # onnxruntime runs the exported float32 graph
                    assert w["dtype"] == dtype, name
        got = run_all(server.url)
    finally:
        server.stop()
    want = float32_answers
    for name in ("clip", "dino", "sam2"):
        assert np.isfinite(got[name]).all(), name
        assert cosine(got[name], want[name]) > 0.98, name
    np.testing.assert_allclose(got["sam3"], want["sam3"], atol=0.05)
    assert np.abs(got["rmbg"] - want["rmbg"]).mean() < 0.02


def test_two_workers_share_one_gpu(tmp_path):
    cfg = demo_config()
    server = serve(tmp_path, {"clip": cfg["clip"]}, "--devices", "1", "--workers-per-device", "2")
    try:
        answers = []

        def call():
            r = requests.post(
                server.url + "/clip/encode_text", json={"text": "two"}, headers=AUTH, timeout=120
            )
            answers.append(r.json()["text_embedding"] if r.status_code == 200 else r.status_code)

        threads = [threading.Thread(target=call) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        info = requests.get(server.url + "/info", headers=AUTH).json()["families"]["clip"]
        metrics = requests.get(server.url + "/metrics", headers=AUTH).text
    finally:
        server.stop()
    assert len(answers) == 32 and len(set(answers)) == 1  # all 200, the same embedding
    # each worker's torch allocator, from its answers' counters (apis/family_worker.py gpu_memory)
    gpu = {
        (s.labels["worker"], s.labels["kind"]): s.value
        for fam in text_string_to_metric_families(metrics)
        for s in fam.samples
        if s.name == "visionserve_gpu_memory_bytes"
    }
    for w in info["workers"]:
        assert (
            w["gpu_memory"]["allocated"] > 0 and w["gpu_memory"]["reserved"] >= w["gpu_memory"]["allocated"]
        )
        for kind in ("allocated", "reserved", "peak_allocated"):
            assert gpu[(str(w["worker"]), kind)] > 0, (w["worker"], kind)
    workers = info["workers"]
    assert len(workers) == 2 and {w["device"] for w in workers} == {"cuda:0"}
    assert len({w["pid"] for w in workers}) == 2
    assert sum(w["requests"]["encode_text"]["ok"] for w in workers if w["requests"]) == 32


def test_devices_places_workers_on_the_named_gpu(tmp_path):
    last = torch.cuda.device_count() - 1
    cfg = demo_config()
    server = serve(tmp_path, {"clip": cfg["clip"], "sam3": cfg["sam3"]}, "--devices", f"{last},")
    try:
        info = requests.get(server.url + "/info", headers=AUTH).json()
        r = requests.post(server.url + "/clip/encode_text", json={"text": "where"}, headers=AUTH, timeout=120)
    finally:
        server.stop()
    assert r.status_code == 200
    for name in ("clip", "sam3"):
        assert [w["device"] for w in info["families"][name]["workers"]] == [f"cuda:{last}"], name


def test_onnxruntime_runs_rmbg_on_the_cuda_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (pip install onnxruntime-gpu in place of onnxruntime)")
    server = serve(tmp_path, {"rmbg": demo_config()["rmbg"]}, "--devices", "1")
    try:
        info = requests.get(server.url + "/info", headers=AUTH).json()
        r = requests.post(server.url + "/rmbg/remove", json={"image": image_b64()}, headers=AUTH, timeout=120)
    finally:
        server.stop()
    assert r.status_code == 200
    onnx = info["families"]["rmbg"]["workers"][0]["onnx"]
    assert all(m["providers"][0] == "CUDAExecutionProvider" for m in onnx.values())
