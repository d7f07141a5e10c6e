"""The worker's batch collection (apis/batching.py), driven directly with a local queue."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace

import pytest
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.utils import LitAPIStatus

from apis import batching
from apis.batching import FirstArrivalBatchedLoop


class Transport:
    def __init__(self):
        self.sent = []

    def send(self, item, consumer_id):
        self.sent.append((consumer_id, item))


def api(max_batch_size=4, batch_timeout=0.0, request_timeout=30.0):
    return SimpleNamespace(
        max_batch_size=max_batch_size, batch_timeout=batch_timeout, request_timeout=request_timeout
    )


def request(i, age=0.0):
    return (0, f"uid-{i}", time.monotonic() - age, f"job-{i}")


@pytest.fixture
def loop():
    lp = FirstArrivalBatchedLoop()
    lp._restart_workers = True  # LitServe sets it; START messages are only sent with restarts on
    return lp


def test_zero_window_takes_what_is_queued_and_reports_each_start(loop):
    q, t = queue.Queue(), Transport()
    for i in range(6):
        q.put(request(i))
    t0 = time.monotonic()
    payloads, timed_out = loop.get_batch_requests(api(max_batch_size=4), q, t)
    assert time.monotonic() - t0 < 0.05
    assert [p[2] for p in payloads] == ["job-0", "job-1", "job-2", "job-3"] and timed_out == []
    assert [item[0] for _, item in t.sent] == ["uid-0", "uid-1", "uid-2", "uid-3"]
    assert all(item[1][1] == LitAPIStatus.START for _, item in t.sent)
    payloads, _ = loop.get_batch_requests(api(max_batch_size=4), q, t)
    assert [p[2] for p in payloads] == ["job-4", "job-5"]


def test_window_opens_at_the_first_arrival(loop):
    def later(q, delay):
        time.sleep(delay)
        q.put(request(0))
        time.sleep(0.03)
        q.put(request(1))

    for window, expected in ((0.15, 2), (0.0, 1)):
        q = queue.Queue()
        # the first request comes 0.2 s after the worker started waiting, later than a 0.15 s
        # window timed from when the worker became free would last; the second is still gathered
        threading.Thread(target=later, args=(q, 0.2)).start()
        payloads, _ = loop.get_batch_requests(api(batch_timeout=window), q, Transport())
        assert len(payloads) == expected
        time.sleep(0.1)


def test_idle_wait_returns_empty_and_sentinel_stops(loop, monkeypatch):
    monkeypatch.setattr(batching, "IDLE_WAIT_S", 0.05)
    assert loop.get_batch_requests(api(), queue.Queue(), Transport()) == ([], [])
    q = queue.Queue()
    q.put(_SENTINEL_VALUE)
    with pytest.raises(_StopLoopError):
        loop.get_batch_requests(api(), q, Transport())


def test_requests_that_waited_too_long_are_reported_not_run(loop):
    q = queue.Queue()
    q.put(request(0, age=60))
    q.put(request(1))
    payloads, timed_out = loop.get_batch_requests(api(request_timeout=30), q, Transport())
    assert [p[1] for p in payloads] == ["uid-1"]
    assert timed_out == [(0, "uid-0")]
