"""Sam3ServicePool against three real servers (seed 000 style: no key, ``--no-auth``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from clients.sam3_client import NoLiveEndpointError, Sam3ServiceClient, Sam3ServicePool, VisionServeError
from tests.conftest import ROOT, ServerProcess

ARCH = ROOT / "configs" / "models" / "sam3-tiny.json"
CONFIG = {
    "sam3": {
        "max_batch_size": 4,
        "models": [{"name": "sam3-tiny", "weights": "random", "arch_config": str(ARCH)}],
    }
}
IMAGE = np.random.default_rng(0).integers(0, 255, (40, 52, 3), dtype=np.uint8)


def same(a: dict, b: dict) -> bool:
    """Equal answers, up to the float rounding of queries batched together (scores to 1e-5)."""
    key = lambda r: (r["prompt"], r["polygon"], r["area"])  # noqa: E731
    return (
        a["image_size"] == b["image_size"]
        and [key(r) for r in a["results"]] == [key(r) for r in b["results"]]
        and all(
            abs(x["score"] - y["score"]) <= 1e-5 and np.allclose(x["bbox"], y["bbox"], atol=1e-3)
            for x, y in zip(a["results"], b["results"], strict=True)
        )
    )


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Three servers for the file; the last test kills and stops them."""
    tmp_path = tmp_path_factory.mktemp("sam3-pool")
    procs = [ServerProcess(CONFIG, tmp_path, ["--no-auth"]) for _ in range(3)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop()


def served(server) -> int:
    """Requests this server's workers answered (its /info counters)."""
    workers = requests.get(server.url + "/info").json()["families"]["sam3"]["workers"]
    return sum(sum(w["requests"].get("predict", {}).values()) for w in workers)


def test_a_dead_endpoint_is_skipped_until_its_health_answers_again(tmp_path, servers):
    up = servers[0]
    before = served(up)
    late = ServerProcess(CONFIG, tmp_path, ["--no-auth"])  # still importing torch: port closed
    try:
        pool = Sam3ServicePool([late.url + "/sam3", up.url + "/sam3"], recheck_after=0.5)
        for _ in range(3):
            assert pool.predict(image=IMAGE, prompts=["cat"])["image_size"] == {"width": 52, "height": 40}
        assert served(up) - before == 3
        late.wait_ready()
        time.sleep(0.6)
        for _ in range(4):
            pool.predict(image=IMAGE, prompts=["cat"])
        assert served(late) == 2 and served(up) - before == 5  # back in the rotation
        # The seed's single-server client works without a key against --no-auth.
        assert Sam3ServiceClient(late.url + "/sam3").health()["status"] == "ok"
    finally:
        late.stop()


def test_round_robin_failover_and_all_dead(servers):
    """Runs last in the file: it kills one of the three servers and stops the others."""
    urls = [s.url + "/sam3" for s in servers]
    base = [served(s) for s in servers]  # the test above used the first one
    pool = Sam3ServicePool(urls)
    assert pool.live() == urls
    first = pool.predict(image=IMAGE, prompts=["cat"], score_threshold=0, min_area=0)
    for _ in range(5):
        assert pool.predict(image=IMAGE, prompts=["cat"], score_threshold=0, min_area=0) == first
    # same random weights everywhere, strict turns
    assert [served(s) - b for s, b in zip(servers, base, strict=True)] == [2, 2, 2]

    # A request's own fault is raised at once, not retried on the others.
    with pytest.raises(VisionServeError) as err:
        pool.predict(image=IMAGE, prompts=[""])
    assert err.value.status == 422
    assert sum(served(s) for s in servers) - sum(base) == 6

    # Kill one server (its whole process group) while 4 threads keep calling.
    victim = servers[1]
    done = []

    def call(i: int) -> dict:
        if i == 6:
            os.killpg(victim.proc.pid, signal.SIGKILL)
        out = pool.predict(image=IMAGE, prompts=["cat"], score_threshold=0, min_area=0)
        done.append(i)
        return out

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(call, range(24)))
    assert len(done) == 24 and all(same(r, first) for r in results)
    victim.proc.wait(10)
    assert served(servers[0]) + served(servers[2]) - base[0] - base[2] >= 6 + 24 - 6
    assert pool.live() == [urls[0], urls[2]]

    # All dead: a clear error naming every endpoint.
    for s in (servers[0], servers[2]):
        s.stop()
    with pytest.raises(NoLiveEndpointError) as err:
        pool.predict(image=IMAGE, prompts=["cat"])
    assert set(err.value.errors) == set(urls)
    assert "no live SAM 3 endpoint among 3" in str(err.value)


class _SlowTurns(Sam3ServicePool):
    """A pool whose turn counter yields to other threads between its read and its write, so
    that without the lock two callers would read the same turn (the race made likely)."""

    @property
    def _next(self) -> int:
        value = self._next_value
        time.sleep(0.002)  # releases the GIL: another thread may read the same value now
        return value

    @_next.setter
    def _next(self, value: int) -> None:
        self._next_value = value


def test_pool_is_thread_safe_about_its_turns():
    pool = _SlowTurns(["http://a", "http://b", "http://c"])
    starts = []
    lock = threading.Lock()

    def take():
        order = pool._turn()
        with lock:
            starts.append(order[0])

    threads = [threading.Thread(target=take) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # each call starts one further: 20 starts on each endpoint, whatever the interleaving
    assert sorted(starts.count(i) for i in range(3)) == [20, 20, 20]
