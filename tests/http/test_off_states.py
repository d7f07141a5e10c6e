"""Settings that turn a behaviour off, each checked by its effect on a real server in that state.

One server, no key: SAM 2 on two workers with ``cache_size: 0`` and ``route_by_image: false``,
SAM 3 on one worker with ``cache_size: 0``, both ``load: eager``. Counters are read from
``/info`` before and after each test's own requests. The on states are the other files' servers
(test_sam2_http: two workers, routing and the cache; test_sam3_http: the cache; test_server_options:
``load: lazy``).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from clients import sam2_client as sc
from clients.common import encode_image
from clients.sam3_client import Sam3ServiceClient
from tests.conftest import ServerProcess
from tests.http.test_sam2_http import ARCH as SAM2_ARCH
from tests.http.test_sam2_http import build_tiny, scene
from tests.http.test_sam3_http import ARCH as SAM3_ARCH
from tests.http.test_sam3_http import tiny_model

SAM2 = "sam2.1_hiera_t"
SAM3 = "sam3-tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    assets = tmp_path_factory.mktemp("off-assets")
    torch.manual_seed(0)
    torch.save({"model": build_tiny().state_dict()}, assets / "sam2.pt")
    torch.save(
        {"model": {f"detector.{k}": v for k, v in tiny_model().state_dict().items()}}, assets / "sam3.pt"
    )
    config = {
        "sam2": {
            "load": "eager",
            "workers_per_device": 2,
            "max_batch_size": 8,
            "cache_size": 0,
            "route_by_image": False,
            "models": [{"name": SAM2, "weights": str(assets / "sam2.pt"), "arch_config": str(SAM2_ARCH)}],
        },
        "sam3": {
            "load": "eager",
            "workers_per_device": 1,
            "cache_size": 0,
            "models": [{"name": SAM3, "weights": str(assets / "sam3.pt"), "arch_config": str(SAM3_ARCH)}],
        },
    }
    proc = ServerProcess(config, tmp_path_factory.mktemp("off-server"), ["--no-auth"])
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def workers(server, family: str) -> list[dict]:
    return requests.get(server.url + "/info", timeout=30).json()["families"][family]["workers"]


def counts(server, family: str, model: str, route: str) -> list[tuple[int, int]]:
    """Per worker: (images encoded, ``route`` requests answered)."""
    return [
        (w["encoded_images"].get(model, 0), w["requests"].get(route, {}).get("ok", 0))
        for w in workers(server, family)
    ]


def grew(before: list[tuple], after: list[tuple]) -> list[tuple[int, ...]]:
    return [tuple(a - b for a, b in zip(wa, wb, strict=True)) for wa, wb in zip(after, before, strict=True)]


def test_eager_workers_load_their_models_before_any_request(server):
    """``load: eager`` (the off state of lazy): every worker lists its model at start-up."""
    assert [w["models_loaded"] for w in workers(server, "sam2")] == [[SAM2], [SAM2]]
    assert [w["models_loaded"] for w in workers(server, "sam3")] == [[SAM3]]


def test_sam2_cache_size_0_encodes_the_image_for_every_prompt(server):
    image = encode_image(scene(seed=500))
    before = counts(server, "sam2", SAM2, "prompt_mask")
    for k in range(3):
        sc.generate_sam2_prompt_masks(
            image=image, point_coords=[[20 + 5 * k, 30]], point_labels=[1], base_url=server.url + "/sam2"
        )
    diff = grew(before, counts(server, "sam2", SAM2, "prompt_mask"))
    assert sum(d[0] for d in diff) == 3 and sum(d[1] for d in diff) == 3, diff


def test_sam3_cache_size_0_encodes_the_image_for_every_request(server):
    client = Sam3ServiceClient(server.url + "/sam3", api_key=None)
    image = encode_image(scene(seed=501))
    before = counts(server, "sam3", SAM3, "predict")
    for prompt in ("a car", "a tree", "a car"):
        client.predict(image=image, prompts=[prompt])
    diff = grew(before, counts(server, "sam3", SAM3, "predict"))
    assert diff == [(3, 3)], diff


def test_route_by_image_false_spreads_one_images_prompts_over_both_workers(server):
    """Prompts on one image sent at once go to whichever worker is least busy, so both answer
    some. With routing on, all eight would go to the worker that has the image (its queue is at
    most max_batch_size, 8, longer than the other's). Up to three rounds, in case a round's
    requests never overlap."""
    url = server.url + "/sam2"
    for round_ in range(3):
        image = encode_image(scene(seed=510 + round_))
        start = threading.Barrier(8)

        def click(k: int, image: str = image, start: threading.Barrier = start) -> np.ndarray:
            start.wait()
            got = sc.generate_sam2_prompt_masks(
                image=image, point_coords=[[10 + 3 * k, 30]], point_labels=[1], base_url=url
            )
            return got

        before = counts(server, "sam2", SAM2, "prompt_mask")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(click, range(8)))
        diff = grew(before, counts(server, "sam2", SAM2, "prompt_mask"))
        assert sum(d[1] for d in diff) == 8, diff
        if all(d[1] > 0 for d in diff):
            return
    pytest.fail(f"every prompt on one image went to one worker: {diff}")


def test_no_auth_is_logged_as_a_warning_and_needs_no_key(server):
    """SECURITY.md: ``--no-auth`` turns checking off and says so as a warning."""
    assert requests.get(server.url + "/info", timeout=30).status_code == 200
    lines = [line for line in server.log().splitlines() if "AUTH DISABLED (--no-auth)" in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
