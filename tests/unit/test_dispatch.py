"""Requests to workers and back (apis/transport/dispatch.py and worker_loop.py), driven directly."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from types import SimpleNamespace

import orjson
import pytest

from apis.core.replies import Reply, Stream
from apis.http.routing import reply_response
from apis.transport.arena import Arena, ArenaOffer
from apis.transport.dispatch import Dispatcher, WorkerLink, frame
from apis.transport.worker_loop import run_batch, serve


def link_pair() -> tuple[socket.socket, WorkerLink]:
    server_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return server_end, WorkerLink(worker_end)


def send(sock: socket.socket, i: int, age: float = 0.0, job=None) -> None:
    for part in frame((i, time.monotonic() - age, job if job is not None else f"job-{i}")):
        sock.sendall(part)


def test_zero_window_takes_what_is_there_up_to_the_limit():
    server, link = link_pair()
    for i in range(6):
        send(server, i)
    t0 = time.monotonic()
    assert [job for _, _, job in link.collect(4, 0.0, 30.0)] == ["job-0", "job-1", "job-2", "job-3"]
    assert time.monotonic() - t0 < 15  # did not wait out the 30 s idle wait
    assert [job for _, _, job in link.collect(4, 0.0, 1.0)] == ["job-4", "job-5"]


def test_window_opens_at_the_first_arrival():
    for window, expected in ((1.0, 2), (0.0, 1)):
        server, link = link_pair()

        def later(server=server):
            time.sleep(1.5)
            send(server, 0)
            time.sleep(0.05)
            send(server, 1)

        # the first request comes 1.5 s after the worker started waiting, later than a 1 s
        # window timed from when the worker became free would last; the second (0.05 s after
        # the first, a 20x margin inside the window) is still gathered
        threading.Thread(target=later).start()
        assert len(link.collect(8, window, 10.0)) == expected
        time.sleep(0.2)


def test_idle_wait_returns_nothing_and_a_closed_server_ends_the_worker():
    server, link = link_pair()
    t0 = time.monotonic()
    assert link.collect(4, 0.0, 0.5) == []
    assert 0.45 < time.monotonic() - t0 < 15  # waited its idle time, and returned
    server.close()
    with pytest.raises(EOFError):
        link.collect(4, 0.0, 1.0)


def test_a_large_request_arrives_whole_across_many_reads():
    server, link = link_pair()
    big = bytes(range(256)) * (12 * 4096)  # 12 MB, far more than one read
    threading.Thread(target=send, args=(server, 7), kwargs={"job": big}).start()
    items = []
    while not items:
        items = link.collect(4, 0.0, 1.0)
    assert items[0][0] == 7 and items[0][2] == big


def api(predict, max_batch_size=4, request_timeout=30.0):
    return SimpleNamespace(
        api_path="/test",
        max_batch_size=max_batch_size,
        request_timeout=request_timeout,
        answer=lambda jobs: [Reply.of({"y": y}) for y in predict(jobs)],
    )


def test_run_batch_answers_in_order_and_skips_requests_that_waited_too_long():
    seen = []

    def predict(xs):
        seen.append(list(xs))
        return [x * 10 for x in xs]

    items = [(0, time.monotonic() - 60, 1), (1, time.monotonic(), 2), (2, time.monotonic(), 3)]
    answers = dict(run_batch(api(predict), items))
    assert seen == [[2, 3]]
    assert orjson.loads(answers[1].body) == {"y": 20} and orjson.loads(answers[2].body) == {"y": 30}
    assert answers[0].status == 504 and orjson.loads(answers[0].body)["error"]["code"] == "queue_timeout"


def test_run_batch_turns_a_crash_into_500s():
    def crash(xs):
        raise RuntimeError("boom")

    answers = run_batch(api(crash), [(0, time.monotonic(), 1), (1, time.monotonic(), 2)])
    codes = [(a.status, orjson.loads(a.body)["error"]["code"]) for _, a in answers]
    assert codes == [(500, "internal_error")] * 2


class FakeWorker:
    """A worker process stand-in: connects, answers each job with (worker, job) after ``delay``."""

    def __init__(self, address: str, worker: int, delay: float = 0.0):
        self.link = WorkerLink.connect(address, worker)
        self.worker, self.delay = worker, delay
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            while True:
                for uid, _, job in self.link.collect(8, 0.0, 0.1):
                    time.sleep(self.delay)
                    self.link.answer(uid, Reply.of({"worker": self.worker, "job": job}))
        except (EOFError, OSError):
            pass

    def die(self):
        self.link.sock.shutdown(socket.SHUT_RDWR)


def test_dispatcher_balances_fails_a_dead_workers_requests_and_waits_for_a_restart():
    async def scenario():
        d = Dispatcher("test")
        try:
            await d.start(timeout=0.5)
            slow = FakeWorker(d.address, 0, delay=0.3)
            fast = FakeWorker(d.address, 1)
            while d.connected < 2:
                await asyncio.sleep(0.01)
            # the busy worker is skipped: four requests at once spread over both
            answers = [orjson.loads(r.body) for r in await asyncio.gather(*(d.submit(i) for i in range(4)))]
            assert sorted(a["job"] for a in answers) == [0, 1, 2, 3]
            assert {a["worker"] for a in answers} == {0, 1}

            # a worker that goes away: what it held is answered worker_died at once
            fast.die()
            while d.connected > 1:
                await asyncio.sleep(0.01)
            held = asyncio.ensure_future(d.submit("held"))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            slow.die()
            died = await held
            assert died.status == 500 and orjson.loads(died.body)["error"]["code"] == "worker_died"
            assert time.monotonic() - t0 < 5  # at once, not after a timeout

            # no worker: a request waits for one to connect, up to the queue timeout
            t0 = time.monotonic()
            lost = await d.submit("lost")
            assert lost.status == 504 and 0.45 < time.monotonic() - t0 < 15
            waiting = asyncio.ensure_future(d.submit("restarted"))
            await asyncio.sleep(0.1)
            FakeWorker(d.address, 0)
            assert orjson.loads((await waiting).body) == {"worker": 0, "job": "restarted"}
        finally:
            d.close()

    asyncio.run(scenario())


def test_requests_naming_an_image_stay_with_its_worker_until_it_is_busier_by_more_than_the_slack():
    async def scenario():
        d = Dispatcher("test", slack=1)
        try:
            await d.start(timeout=1.0)
            FakeWorker(d.address, 0, delay=0.05)
            while d.connected < 1:
                await asyncio.sleep(0.01)
            FakeWorker(d.address, 1, delay=0.05)
            while d.connected < 2:
                await asyncio.sleep(0.01)

            async def workers(*jobs):
                answers = await asyncio.gather(*(d.submit(job, affinity) for job, affinity in jobs))
                return [orjson.loads(a.body)["worker"] for a in answers]

            # all idle: the first worker; the same image again goes back there although the
            # other one is idle, and without a key the load is spread as before
            assert await workers(("a1", "A")) == [0]
            assert await workers(("b1", None), ("a2", "A")) == [0, 0]
            assert await workers(("x", None), ("y", None)) == [0, 1]
            # four at once on one image: its home takes them while it has at most slack (1)
            # more in flight than the least busy; then the other worker becomes a home too
            assert await workers(*((f"a{i}", "A") for i in range(3, 7))) == [0, 0, 1, 1]
            # another image starts on the least busy worker, both homes of A stay homes
            assert await workers(("c1", "C"), ("a7", "A"), ("c2", "C")) == [0, 1, 0]
            # a home that went away is forgotten
            for link in list(d._links):
                if link.worker == 0:
                    link._transport.close()
            while d.connected > 1:
                await asyncio.sleep(0.01)
            assert await workers(("c3", "C")) == [1]
        finally:
            d.close()

    asyncio.run(scenario())


def test_requests_naming_only_an_image_id_wait_at_its_home_however_busy():
    async def scenario():
        d = Dispatcher("test", slack=0)
        try:
            await d.start(timeout=1.0)
            for w in range(2):
                FakeWorker(d.address, w, delay=0.05)
                while d.connected < w + 1:
                    await asyncio.sleep(0.01)

            async def workers(*jobs):
                answers = await asyncio.gather(*(d.submit(job, key, stay) for job, key, stay in jobs))
                return [orjson.loads(a.body)["worker"] for a in answers]

            assert await workers(("a1", "A", False)) == [0]
            # with slack 0 a second image request would move to the idle worker; id-only ones stay
            assert await workers(*((f"a{i}", "A", True) for i in range(2, 6))) == [0, 0, 0, 0]
            # an id no worker was sent goes to the least busy, which does not become its home
            assert await workers(("b1", None, False), ("z1", "Z", True)) == [0, 1]
            assert "Z" not in d._homes
            assert await workers(("a6", "A", False), ("a7", "A", False)) == [0, 1]  # moves on
        finally:
            d.close()

    asyncio.run(scenario())


def test_the_arena_ring_starts_over_when_read_wraps_and_refuses_what_does_not_fit_now():
    reader, fd = Arena.create(100)
    writer = ArenaOffer(os.getpid(), fd, 100).join()  # a second mapping, as a worker maps it
    try:
        a, b = writer.put(b"a" * 40), writer.put(b"b" * 40)
        assert (a, b) == ((0, 40), (40, 80))
        assert writer.put(b"c" * 30) is None  # only 20 left at the end, and "a" is unread
        assert reader.take(*a) == b"a" * 40
        assert writer.put(b"c" * 30) == (100, 130)  # wraps to offset 0, where "a" was
        assert reader.take(*b) == b"b" * 40 and reader.take(100, 130) == b"c" * 30
        assert writer.put(b"d" * 100) == (200, 300)  # all read: starts at offset 0 again
        assert reader.take(200, 300) == b"d" * 100
        assert writer.put(b"e" * 101) is None  # larger than the arena: the socket takes it
    finally:
        writer.close()
        reader.close()
        os.close(fd)


def test_a_worker_that_cannot_map_the_arena_says_so_and_keeps_the_socket(caplog):
    assert ArenaOffer(os.getpid(), 987654, 100).join() is None
    assert "answers go through the socket" in caplog.text


@pytest.mark.parametrize("arena_bytes", [64 << 20, 1 << 20], ids=["through the arena", "too big for it"])
def test_an_answer_body_travels_as_raw_bytes_with_its_status_headers_and_stats(monkeypatch, arena_bytes):
    monkeypatch.setattr("apis.transport.dispatch.ARENA_BYTES", arena_bytes)
    body = bytes(range(256)) * (12 * 4096)  # 12 MB, more than the socket buffers

    async def scenario():
        d = Dispatcher("test")
        try:
            await d.start(timeout=5.0)
            link = WorkerLink.connect(d.address, 3)

            def serve():
                items = []
                while not items:
                    items = link.collect(1, 0.0, 1.0)
                reply = Reply(201, body, "application/x-npy", {"X-Visionserve-Model": "m"}, ("k", {"n": 1}))
                link.answer(items[0][0], reply)

            threading.Thread(target=serve, daemon=True).start()
            reply = await d.submit("job")
            assert (reply.status, reply.media_type, reply.headers, reply.stats) == (
                201,
                "application/x-npy",
                {"X-Visionserve-Model": "m"},
                ("k", {"n": 1}),
            )
            assert reply.body == body
            assert link._arena._written == (len(body) if arena_bytes > len(body) else 0)
            response = reply_response(reply)
            assert response.body == body and response.headers["content-length"] == str(len(body))
            assert response.headers["x-visionserve-model"] == "m"
            link.close()
        finally:
            d.close()

    asyncio.run(scenario())


class StreamingApi:
    """A family stand-in for the real worker loop (apis/transport/worker_loop.serve): a job
    ``("stream", name, n)`` answers ``n`` parts, each taking ``PART_S``; any other job answers at once."""

    PART_S = 0.05
    max_batch_size, batch_timeout, request_timeout, api_path, token = 8, 0.0, None, "/fake", None

    def __init__(self, address: str):
        self.spec = SimpleNamespace(address=address)
        self.computed: dict[str, list[float]] = {}  # stream name -> when each part was computed

    def answer(self, jobs):
        return [
            self._parts(job[1], job[2]) if job[0] == "stream" else Reply.of({"answer": job}) for job in jobs
        ]

    def _parts(self, name: str, n: int):
        times = self.computed[name] = []

        def parts():
            for i in range(n):
                time.sleep(self.PART_S)
                times.append(time.monotonic())
                yield {"stream": name, "part": i}

        return Stream(parts())

    def stamp(self, reply):
        return reply

    def housekeeping(self):
        pass


def test_streams_interleave_take_new_requests_between_parts_and_stop_when_withdrawn():
    async def scenario():
        d = Dispatcher("test")
        await d.start(timeout=5)
        api = StreamingApi(d.address)
        threading.Thread(target=serve, args=(api, 0), daemon=True).start()
        while d.connected < 1:
            await asyncio.sleep(0.01)
        try:
            # a short request is answered between two parts of a long stream
            long = d.stream(("stream", "long", 40))
            first = await anext(long)
            assert first.more and orjson.loads(first.body) == {"stream": "long", "part": 0}
            short = await d.submit("short")
            assert orjson.loads(short.body) == {"answer": "short"}
            assert len(api.computed["long"]) <= 3  # answered within a part or two, not after 40
            # two streams take turns, one part each
            other = [reply async for reply in d.stream(("stream", "other", 3))]
            assert [r.more for r in other] == [True, True, True, False]
            theirs, mine = api.computed["other"], api.computed["long"]
            assert all(any(a < t < b for t in mine) for a, b in zip(theirs[:-1], theirs[1:], strict=True))
            # a withdrawn stream stops before its next part
            computed = len(api.computed["long"])
            withdrawn_at = time.monotonic()
            await long.aclose()
            await asyncio.sleep(10 * api.PART_S)
            after = [t for t in api.computed["long"] if t > withdrawn_at]
            assert len(after) <= 1, after  # the part being computed when the withdrawal came
            assert len(api.computed["long"]) < 40 and computed < 40
            assert sum(len(link.waiting) for link in d._links) == 0
        finally:
            d.close()

    asyncio.run(scenario())
