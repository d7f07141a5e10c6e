"""Requests to model workers and answers back: one Unix socket per worker, no broker.

LitServe 0.2.19 sends every request through its manager process: the HTTP process puts it on a
manager queue, the worker takes it from there, reports "started" on a second queue and answers
on it, and a thread hands each answer to the event loop. That is four round trips to a third
process per request, ~3 ms of a 33 ms ``encode_text`` (docs/benchmarks.md). Here the HTTP
process's event loop writes each request straight to a worker's socket and reads the answer
from it:

* each family listens on one socket, made before its workers start; a worker connects once its
  models are loaded, and a restarted worker connects again;
* a request goes to the connected worker with the fewest requests in flight;
* a worker that dies closes its socket, and the requests it held are answered at once (500
  ``worker_died``): no polling, and no request of another family is touched.

Frames are an 8-byte length and a pickle, both ways. The socket lives in a private (0700)
directory: only this user's processes can reach it, as with LitServe's manager.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import select
import shutil
import socket
import struct
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError

log = logging.getLogger("visionserve")
_LENGTH = struct.Struct("!Q")
_CHUNK = 1 << 20


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(size))


def worker_died() -> dict:
    return APIError(
        500,
        "the model worker stopped while handling this request; it is being restarted, retry",
        code="worker_died",
    ).to_wire()


def queue_timeout() -> dict:
    return APIError(
        504,
        "the request waited in the queue longer than the server's timeout; retry later",
        code="queue_timeout",
    ).to_wire()


@dataclass(eq=False)
class _Link:
    """One connected worker, as the HTTP process sees it."""

    worker: int
    pid: int
    writer: asyncio.StreamWriter
    waiting: dict[int, asyncio.Future] = field(default_factory=dict)


class Dispatcher:
    """HTTP process: a family's listening socket, its connected workers and their open requests."""

    def __init__(self, family: str):
        self.family = family
        self._dir = tempfile.mkdtemp(prefix=f"visionserve-{family}-")
        self.address = os.path.join(self._dir, "workers.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(64)  # workers that connect before start() wait in the backlog
        self._links: list[_Link] = []
        self._ids = itertools.count()
        self._server: asyncio.Server | None = None
        self._connected: asyncio.Event | None = None
        self.queue_timeout = -1.0

    async def start(self, queue_timeout: float) -> None:
        """Accept workers on the running event loop (the HTTP server's)."""
        self.queue_timeout = queue_timeout
        self._connected = asyncio.Event()
        self._server = await asyncio.start_unix_server(self._serve, sock=self._listener)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def connected(self) -> int:
        return len(self._links)

    async def submit(self, job: Any) -> Any:
        """The answer (a wire value) of the least busy worker to ``job``. Waits for a worker to
        connect (a restart) up to the queue timeout; the worker itself drops a request that
        waited longer than that before it could start it."""
        sent = time.monotonic()
        while not self._links:
            limit = (
                None if self.queue_timeout in (-1, False) else sent + self.queue_timeout - time.monotonic()
            )
            try:
                await asyncio.wait_for(self._connected.wait(), limit)
            except TimeoutError:
                return queue_timeout()
        link = min(self._links, key=lambda k: len(k.waiting))
        uid = next(self._ids)
        answer = link.waiting[uid] = asyncio.get_running_loop().create_future()
        link.writer.write(frame((uid, sent, job)))
        try:
            return await answer
        finally:
            link.waiting.pop(uid, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            worker, pid = await _read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        link = _Link(worker, pid, writer)
        self._links.append(link)
        self._connected.set()
        log.debug("%s worker %d (pid %d) connected", self.family, worker, pid)
        try:
            while True:
                uid, answer = await _read_frame(reader)
                waiting = link.waiting.pop(uid, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._links.remove(link)
            if not self._links:
                self._connected.clear()
            writer.close()
            if link.waiting:
                log.warning(
                    "%s worker %d (pid %d) went away with %d request(s) in flight; they get worker_died",
                    self.family,
                    worker,
                    pid,
                    len(link.waiting),
                )
            for waiting in link.waiting.values():
                if not waiting.done():
                    waiting.set_result(worker_died())


class WorkerLink:
    """Worker process: its connection to the HTTP process, read a batch at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buffer = bytearray()
        self._frames: deque = deque()

    @classmethod
    def connect(cls, address: str, worker: int) -> WorkerLink:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        sock.sendall(frame((worker, os.getpid())))
        return cls(sock)

    def collect(self, limit: int, window: float, idle_wait: float) -> list:
        """Up to ``limit`` requests ``(uid, sent, job)``. Blocks up to ``idle_wait`` for the
        first ([] if none comes), then takes more until ``window`` seconds after it arrived;
        window 0 takes what is already there. Raises EOFError once the server has gone."""
        if not self._frames:
            self._receive(idle_wait)
            if not self._frames:
                return []
        deadline = time.monotonic() + window
        while len(self._frames) < limit and self._receive(max(deadline - time.monotonic(), 0.0)):
            pass
        return [self._frames.popleft() for _ in range(min(limit, len(self._frames)))]

    def answer(self, uid: int, answer: Any) -> None:
        self.sock.sendall(frame((uid, answer)))

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> bool:
        """Read what arrives within ``timeout`` (0: what is there now); False if nothing did."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return False
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise EOFError("the HTTP process closed the connection")
        self._buffer += chunk
        while len(self._buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buffer)
            end = _LENGTH.size + size
            if len(self._buffer) < end:
                break
            self._frames.append(pickle.loads(memoryview(self._buffer)[_LENGTH.size : end]))
            del self._buffer[:end]
        return True
