"""A client that leaves stops its computation at the next chunk boundary (apis/core/withdrawal.py,
WorkerLink.withdrawn, run_batch and FamilyAPI), driven directly; tests/http/test_observability.py
measures it on the real server (auto_mask)."""

from __future__ import annotations

import socket
import time

import pytest

from apis.core import withdrawal
from apis.core.replies import Reply
from apis.transport.dispatch import Withdraw, WorkerLink, frame
from apis.transport.worker_loop import run_batch


def test_check_stops_only_once_every_job_served_is_withdrawn():
    withdrawal.check()  # outside a worker: nothing to ask
    gone = {"a"}
    with withdrawal.watching(lambda job: job in gone):
        withdrawal.check()  # serving nothing yet
        with withdrawal.serving(["a", "b"]):
            withdrawal.check()  # "b" still waits: the chunk runs on
            gone.add("b")
            with pytest.raises(withdrawal.Withdrawn, match="2 request"):
                withdrawal.check()
        with withdrawal.serving(["c"]):
            withdrawal.check()
    with withdrawal.serving(["a"]):
        withdrawal.check()  # nobody watching any more


def test_a_withdraw_frame_reaches_the_running_batch_and_queued_requests_are_dropped():
    server, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = WorkerLink(worker_end)
    for uid in (1, 2):
        for part in frame((uid, time.monotonic(), f"job-{uid}")):
            server.sendall(part)
    assert [uid for uid, _, _ in link.collect(1, 0.0, 5.0)] == [1]  # 1 runs, 2 waits in the link
    assert not link.withdrawn(1)
    for uid in (1, 2):
        server.sendall(b"".join(frame(Withdraw(uid))))
    assert link.withdrawn(1) and not link.withdrawn(2)  # 2 was not running: dropped instead
    assert link.collect(4, 0.0, 0.1) == []
    assert link.gone == {1}  # kept until the worker loop has stopped what it names (once a turn)


class _Chunked:
    """Just enough of a family for run_batch: an answer over chunks that asks between them."""

    api_path = "/x"
    request_timeout = 30
    max_batch_size = 1

    def __init__(self):
        self.chunks = 0

    def answer(self, jobs):
        with withdrawal.serving(jobs):
            try:
                for _ in range(10):
                    withdrawal.check()
                    self.chunks += 1
            except withdrawal.Withdrawn:
                return [Reply.of({"stopped_after": self.chunks})]
        return [Reply.of({"chunks": self.chunks})]


def test_run_batch_lets_the_model_ask_about_its_requests():
    api, job = _Chunked(), object()
    (_, answer), *_ = run_batch(api, [(7, time.monotonic(), job)], withdrawn=lambda uid: uid == 7)
    assert answer.body == b'{"stopped_after":0}' and api.chunks == 0
    api = _Chunked()
    (_, answer), *_ = run_batch(api, [(8, time.monotonic(), job)], withdrawn=lambda uid: uid == 7)
    assert answer.body == b'{"chunks":10}'
