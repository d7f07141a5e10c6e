"""``GET /<family>/health`` answers what the seeds' clients read: seed 004's HealthResponse for
clip, dino and sam2 (every field, its type, and its value against ``/info``), seed 000's
``{"status": "ok"}`` for sam3 and rmbg; open, through the seed-compatible clients' helpers."""

from __future__ import annotations

import pytest
import requests
from pydantic import BaseModel, ConfigDict

from clients import clip_client, dino_client, rmbg_client, sam2_client
from clients.sam3_client import Sam3ServiceClient, Sam3ServicePool
from tests.conftest import KEYS

AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


class Seed004Health(BaseModel):
    """Seed 004's HealthResponse, written from its field list: each key required, types strict."""

    model_config = ConfigDict(strict=True)
    status: str
    device: str
    worker_id: int
    gpu_id: int | None
    gpu_count: int
    models_loaded: list[str]
    total_model_instances: int
    request_counter: int


class Seed000Health(BaseModel):
    """What seed 000's client and pool read from ``/health``: ``status == "ok"``."""

    model_config = ConfigDict(strict=True)
    status: str


HELPERS = {
    "clip": clip_client.health,
    "dino": dino_client.health,
    "sam2": sam2_client.health,
    "sam3": lambda base_url: Sam3ServiceClient(base_url).health(),
    "rmbg": rmbg_client.health,
}


def info_of(server, family: str) -> dict:
    return requests.get(server.url + "/info", headers=AUTH, timeout=30).json()["families"][family]


@pytest.mark.parametrize("family", ["clip", "dino", "sam2"])
def test_seed_004_health_fields_and_their_meaning(demo_server, family):
    # the helpers send no key here (no servers.yaml entry, no $VISIONSERVE_API_KEY): health is open
    body = HELPERS[family](base_url=f"{demo_server.url}/{family}")
    h = Seed004Health.model_validate(body)
    assert h.status == "ok" and body["family"] == family
    assert body["workers_ready"] == body["workers"] >= 1
    workers = info_of(demo_server, family)["workers"]
    assert h.device == ",".join(dict.fromkeys(w["device"] for w in workers)) == "cpu"
    assert h.gpu_id is None and h.gpu_count == 0  # the demo runs on CPU
    assert h.models_loaded == sorted({m for w in workers for m in w["models_loaded"]})
    assert h.models_loaded  # demo.yaml loads eagerly
    assert h.total_model_instances == sum(len(w["models_loaded"]) for w in workers)
    assert h.worker_id == demo_server.proc.pid  # the process that answered


def test_request_counter_counts_answered_requests(demo_server):
    before = clip_client.health(base_url=demo_server.url + "/clip")["request_counter"]
    assert before == sum(
        n for counts in info_of(demo_server, "clip")["requests"].values() for n in counts.values()
    )
    for text in ("a", "b", "c"):
        r = requests.post(
            demo_server.url + "/clip/encode_text", json={"text": text}, headers=AUTH, timeout=60
        )
        assert r.status_code == 200
    after = clip_client.health(base_url=demo_server.url + "/clip")["request_counter"]
    assert after - before == 3


@pytest.mark.parametrize("family", ["sam3", "rmbg"])
def test_seed_000_health_and_pool(demo_server, family):
    body = HELPERS[family](base_url=f"{demo_server.url}/{family}")
    assert Seed000Health.model_validate(body).status == "ok"
    assert body["family"] == family and body["workers_ready"] == body["workers"] >= 1
    if family == "sam3":  # the seed pool keeps an endpoint live only if its /health says ok
        assert Sam3ServicePool([f"{demo_server.url}/sam3"]).live() == [f"{demo_server.url}/sam3"]
