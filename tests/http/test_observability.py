"""/metrics (Prometheus), X-Request-ID and --log-format json, on the real server."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from apis.core.logs import REQUEST_ID
from apis.family_worker import gpu_memory
from apis.http.metrics import Exchange, Metrics, failure_reason, request_id_from
from apis.transport.dispatch import timed_out_reply, worker_died_reply
from apis.transport.worker_loop import run_batch
from clients.clip_client import encode_clip_text_decoded
from clients.sam2_client import generate_sam2_auto_masks_decoded, sam2_point_mask
from tests.conftest import ROOT, ServerProcess, free_port

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def config() -> dict:
    models = ROOT / "configs" / "models"
    return {
        "clip": {
            "max_batch_size": 8,
            "models": [
                {
                    "name": "clip-tiny",
                    "pretrained": "random",
                    "weights": "random",
                    "arch_config": str(models / "clip-tiny.json"),
                }
            ],
        },
        "sam2": {
            "max_batch_size": 1,  # one request at a time: the others queue, which the gauges show
            "cache_size": 4,
            "models": [
                {"name": "sam2-tiny", "weights": "random", "arch_config": str(models / "sam2-tiny.json")}
            ],
        },
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    metrics_port = free_port()
    proc = ServerProcess(
        config(),
        tmp,
        ["--api-key", KEY, "--log-format", "json", "--metrics-port", str(metrics_port)],
        env={"OMP_NUM_THREADS": "1"},  # as deploy/k8s sets it from the CPU limit
    )
    proc.metrics_url = f"http://127.0.0.1:{metrics_port}"
    try:
        yield proc.wait_ready(300)
    finally:
        proc.stop()


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    r = requests.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def test_metrics_need_the_key(server):
    r = requests.get(server.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"]


def test_metrics_port_serves_metrics_alone_without_a_key(server):
    """What the shipped PodMonitor scrapes: no key, the same series, nothing else on that port."""
    r = requests.get(server.metrics_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse(r.text)
    assert value(m, "visionserve_family_available", family="clip") == 1
    build = [labels for name, labels in m if name == "visionserve_build_info"]
    assert len(build) == 1 and dict(build[0])["version"] and m[("visionserve_build_info", build[0])] == 1
    assert value(m, "process_resident_memory_bytes") > 0 and value(m, "process_open_fds") > 0
    assert any(name == "python_gc_objects_collected_total" for name, _ in m)
    assert not any(name == "visionserve_gpu_memory_bytes" for name, _ in m)  # CPU: tests/http/test_cuda.py
    for path in ("/clip/encode_text", "/info", "/health", "/metrics/x"):
        assert requests.get(server.metrics_url + path).status_code == 404
    assert requests.post(server.metrics_url + "/metrics").status_code == 405


def test_workers_size_their_thread_pool_from_omp_num_threads(server):
    families = requests.get(server.url + "/info", headers=AUTH).json()["families"]
    assert [w["threads"] for fam in families.values() for w in fam["workers"]] == [1, 1]


def test_counters_move(server, image_root):
    photo = str(image_root / "photo.png")
    before = scrape(server.url)
    for text in ("a", "b", "c"):
        encode_clip_text_decoded(text, base_url=server.url + "/clip", api_key=KEY)
    bad = requests.post(server.url + "/clip/encode_text", json={"text": 3}, headers=AUTH)
    assert bad.status_code == 422
    kw = {"base_url": server.url + "/sam2", "api_key": KEY, "point_coords": [[10, 10]], "point_labels": [1]}
    sam2_point_mask(photo, **kw)  # a new image: encoded
    sam2_point_mask(photo, **kw)  # the same image: from the cache
    after = scrape(server.url)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"family": "clip", "route": "/clip/encode_text", "method": "POST", "status": "200"}
    assert moved("visionserve_requests_total", **ok) == 3
    assert moved("visionserve_request_duration_seconds_count", **ok) == 3
    assert moved("visionserve_requests_total", **{**ok, "status": "422"}) == 1
    route = {"family": "clip", "route": "/clip/encode_text"}
    assert moved("visionserve_request_failures_total", **route, reason="client_error") == 1
    # the worker's timings of the 3 answered requests (the 422 never reached a worker)
    for name in ("visionserve_queue_wait_seconds", "visionserve_compute_seconds"):
        assert moved(f"{name}_count", **route) == 3
        assert moved(f"{name}_sum", **route) > 0
    end_to_end = moved("visionserve_request_duration_seconds_sum", **ok)
    assert moved("visionserve_compute_seconds_sum", **route) < end_to_end
    assert moved("visionserve_queue_wait_seconds_sum", **route) < end_to_end
    batches = {"family": "clip", "op": "encode_text", "worker": "0"}
    assert (
        value(after, "visionserve_batch_size_count", **batches)
        - value(before, "visionserve_batch_size_count", **batches)
        == 3
    )  # one at a time: each request was its own batch
    assert value(after, "visionserve_batch_size_bucket", **batches, le="1.0") == value(
        after, "visionserve_batch_size_count", **batches
    )
    cache = {"family": "sam2", "model": "sam2-tiny", "worker": "0"}
    for name in ("visionserve_cache_hits_total", "visionserve_cache_misses_total"):
        assert value(after, name, **cache) - value(before, name, **cache) == 1
    for fam, model in (("clip", "clip-tiny/random"), ("sam2", "sam2-tiny")):
        assert value(after, "visionserve_model_load_seconds", family=fam, model=model, worker="0") > 0
        assert value(after, "visionserve_family_available", family=fam) == 1
        assert value(after, "visionserve_requests_in_flight", family=fam) == 0
        assert value(after, "visionserve_queue_depth", family=fam) == 0


def test_v1_embeddings_count_under_the_family_that_serves_them(server):
    before = scrape(server.url)
    r = requests.post(
        server.url + "/v1/embeddings", json={"model": "clip-tiny/random", "input": ["a", "b"]}, headers=AUTH
    )
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    after = scrape(server.url)
    route = {"family": "clip", "route": "/v1/embeddings"}
    ok = {**route, "method": "POST", "status": "200"}
    assert (
        value(after, "visionserve_requests_total", **ok) - value(before, "visionserve_requests_total", **ok)
        == 1
    )
    for name in ("visionserve_queue_wait_seconds_count", "visionserve_compute_seconds_count"):
        assert value(after, name, **route) - value(before, name, **route) == 1
    assert not any(dict(labels).get("family") == "v1" for _, labels in after)
    assert value(after, "visionserve_requests_in_flight", family="clip") == 0  # counted up, then down


def test_failure_reasons_are_the_server_error_codes():
    assert failure_reason(500, worker_died_reply().body) == "worker_died"
    assert failure_reason(504, timed_out_reply().body) == "queue_timeout"
    assert failure_reason(422, b"{}") == "client_error"
    assert failure_reason(502, b"<html>bad gateway</html>") == "server_error"
    assert failure_reason(500, b'{"error": {"code": "a b\\nc"}}') == "server_error"  # no label forging


def test_in_flight_and_queue_depth_while_busy(server, image_root):
    """Three slow auto_mask requests on a worker that takes one at a time: while the first runs,
    all three are in flight and two wait in the queue."""
    photo = str(image_root / "photo.png")
    kw = {"base_url": server.url + "/sam2", "api_key": KEY, "preset": "coarse", "mask_encoding": "packbits"}
    threads = [
        threading.Thread(
            target=generate_sam2_auto_masks_decoded,
            args=(photo,),
            kwargs={**kw, "points_per_side": 32, "crop_n_layers": 0},
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads) and len(seen) < 2000:
        m = scrape(server.url)
        seen.append(
            (
                value(m, "visionserve_requests_in_flight", family="sam2"),
                value(m, "visionserve_queue_depth", family="sam2"),
            )
        )
        if seen[-1] == (3, 2):
            break
    for t in threads:
        t.join()
    assert (3, 2) in seen, seen[-5:]
    m = scrape(server.url)
    assert value(m, "visionserve_requests_in_flight", family="sam2") == 0
    assert value(m, "visionserve_queue_depth", family="sam2") == 0


def test_worker_restart_is_counted(server):
    info = requests.get(server.url + "/info", headers=AUTH).json()
    pid = info["families"]["clip"]["workers"][0]["pid"]
    before = value(scrape(server.url), "visionserve_worker_restarts_total", family="clip")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if value(scrape(server.url), "visionserve_worker_restarts_total", family="clip") == before + 1:
            break
        time.sleep(0.5)
    assert value(scrape(server.url), "visionserve_worker_restarts_total", family="clip") == before + 1
    assert encode_clip_text_decoded("back", base_url=server.url + "/clip", api_key=KEY).shape == (32,)


def test_request_id_is_echoed_and_logged_as_json(server):
    r = requests.post(
        server.url + "/clip/encode_text", json={"text": "hi"}, headers={**AUTH, "X-Request-ID": "job-42.a"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "job-42.a"
    for hostile in ("has spaces", "x" * 129, "new\u00e9line"):
        r = requests.get(server.url + "/health", headers={"X-Request-ID": hostile.encode("utf-8")})
        assert r.headers["x-request-id"] != hostile and len(r.headers["x-request-id"]) == 32
    generated = requests.get(server.url + "/health").headers["x-request-id"]
    assert len(generated) == 32 and generated != requests.get(server.url + "/health").headers["x-request-id"]
    unauthorised = requests.get(server.url + "/info", headers={"X-Request-ID": "no-key-1"})
    assert unauthorised.status_code == 401 and unauthorised.headers["x-request-id"] == "no-key-1"

    time.sleep(0.5)  # let the log file catch up
    lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    assert lines and all(
        {"time", "level", "logger", "message", "request_id", "pid"} <= set(ln) for ln in lines
    )
    assert len({ln["pid"] for ln in lines}) >= 3  # the HTTP process and each family's worker
    ours = [ln for ln in lines if ln["request_id"] == "job-42.a"]
    assert ours and any("/clip/encode_text" in ln["message"] for ln in ours)  # uvicorn's access line


class _Api:
    """Just enough of a family for run_batch: records the request id its answer sees."""

    api_path = "/x"
    request_timeout = 30
    max_batch_size = 4
    seen: list[str] = []

    def answer(self, jobs):
        from apis.core.replies import Reply

        self.seen.append(REQUEST_ID.get())
        return [Reply.of({"ok": True}) for _ in jobs]


def test_worker_batches_carry_their_request_ids():
    class Job:
        def __init__(self, rid):
            self.request_id = rid

    api = _Api()
    now = time.monotonic()
    answers = run_batch(api, [(1, now - 2.0, Job("a")), (2, now, Job("b"))])
    assert [uid for uid, _ in answers] == [1, 2]
    assert api.seen == ["a,b"] and REQUEST_ID.get() == "-"
    # each answer carries its own wait and its batch's compute time (the histograms' inputs)
    (_, first), (_, second) = answers
    assert 2.0 <= first.queue_s < 3.0 and 0 <= second.queue_s < 1.0
    assert first.compute_s == second.compute_s and 0 <= first.compute_s < 1.0
    (_, late), *_ = run_batch(api, [(3, now - 60.0, Job("c"))])
    assert late.status == 504 and late.queue_s >= 60 and late.compute_s is None


def test_request_id_validation():
    assert request_id_from(b"abc-DEF_1.2:3") == "abc-DEF_1.2:3"
    for bad in (b"", b"a b", b"x" * 129, b"\xff", b'a"b', b"a\nb"):
        assert len(request_id_from(bad)) == 32


def test_a_client_that_leaves_stops_auto_mask_at_the_next_point_batch(server):
    """An auto_mask of 1024 points in 128 batches; the client leaves after 1 s. The worker stops
    at the next point batch (apis/core/withdrawal.py) instead of computing the rest for nobody,
    and takes the next request."""
    buf = io.BytesIO()  # large enough that a point batch (masks at full size) takes a while
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "PNG")
    body = {
        "image": base64.b64encode(buf.getvalue()).decode(),
        "points_per_side": 32,
        "points_per_batch": 8,
        "crop_n_layers": 0,
        "mask_encoding": "packbits",
    }
    stops = "sam2/auto_mask stopped: 1 request(s) withdrawn"
    before = server.log().count(stops)
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + "/sam2/auto_mask", json=body, headers=AUTH, timeout=1.0)
    left = time.monotonic()
    while server.log().count(stops) == before and time.monotonic() - left < 60:
        time.sleep(0.05)
    stopped_after = time.monotonic() - left
    assert server.log().count(stops) == before + 1, server.log()[-3000:]
    small = requests.post(server.url + "/sam2/auto_mask", json={**body, "points_per_side": 2}, headers=AUTH)
    assert small.status_code == 200, small.text
    print(f"client left after 1 s; the worker stopped {stopped_after:.2f} s later")


def test_a_v1_request_joins_its_familys_gauge_when_its_handler_submits():
    clip = SimpleNamespace(family="clip", spec=SimpleNamespace(dispatcher=None), worker_stats=dict)
    metrics = Metrics([clip])
    exchange = Exchange(metrics, metrics.family_of("/v1/embeddings"))
    gauge = ("visionserve_requests_in_flight", {"family": "clip"})
    assert exchange.family is None and metrics.registry.get_sample_value(*gauge) == 0
    exchange.serves("clip")
    exchange.serves("clip")  # a second job of the same request counts once
    assert exchange.family == "clip" and metrics.registry.get_sample_value(*gauge) == 1


def test_gpu_memory_of_a_cuda_worker_becomes_a_metric(monkeypatch):
    """The CUDA code path without a GPU: torch's allocator counters, faked, through the
    collector (tests/http/test_cuda.py reads the real ones on a GPU)."""
    import torch

    assert gpu_memory(torch.device("cpu")) == {}
    for name, value in (("memory_allocated", 100), ("memory_reserved", 300), ("max_memory_allocated", 200)):
        monkeypatch.setattr(torch.cuda, name, lambda device, value=value: value)
    snap = {"family": "sam2", "worker": 1, "device": "cuda:0", **gpu_memory(torch.device("cuda:0"))}
    api = SimpleNamespace(
        family="sam2", spec=SimpleNamespace(dispatcher=None), worker_stats=lambda: {"w": snap}
    )
    text = Metrics([api]).render().decode()
    got = {
        s.labels["kind"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "visionserve_gpu_memory_bytes"
    }
    assert got == {"allocated": 100, "reserved": 300, "peak_allocated": 200}
    assert 'device="cuda:0"' in text and 'worker="1"' in text
