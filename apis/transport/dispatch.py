"""Requests to model workers and answers back: one Unix socket per worker, no broker.

The HTTP process's event loop writes each request straight to a worker's socket and reads the
answer from it: no broker process, no polling thread (docs/benchmarks.md compares LitServe's
own transports):

* each family listens on one socket, made before its workers start; a worker connects once its
  models are loaded, and a restarted worker connects again;
* a request goes to the connected worker with the fewest requests in flight, unless it names an
  image that a worker has cached (``affinity``): then it goes to that worker while its queue is
  at most ``slack`` requests longer than the least busy one's;
* a worker that dies closes its socket, and the requests it held are answered at once (500
  ``worker_died``): no polling, and no request of another family is touched;
* a request whose client went away (its handler is cancelled) is withdrawn with a
  :class:`Withdraw` frame: a worker drops it if it has not started it yet, and stops its stream
  before the next part if it is streaming one;
* an answer may come in parts (:meth:`Dispatcher.stream`): the worker sends each part of one
  request as it is made, flagged ``more`` until the last;
* each connection has a token, chosen by the worker, that a request may be pinned to
  (``pin``): state that lives in one worker (a video session) is reached only there, and a
  token whose worker has gone is told apart from one never seen (:meth:`Dispatcher.pin_state`).

A frame is a pickle and an optional blob of raw bytes, each read straight into a buffer of its
size. An answer's rendered body (:class:`~apis.core.replies.Reply`) goes through the worker's shared
memory arena (apis/transport/arena.py) when it has one, or else as the blob, so the HTTP process sends a
multi-MB body without unpickling it. The socket lives in a private (0700) directory: only this
user's processes can reach it, as with LitServe's manager.
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
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, replace
from typing import Any

from apis.core.errors import APIError
from apis.core.replies import Reply
from apis.core.sessions import new_token
from apis.transport.arena import ARENA_BYTES, Arena, ArenaOffer

log = logging.getLogger("visionserve")
_HEAD = struct.Struct("!QQ")  # the lengths of a frame's pickle and of its blob
_SOCKET_BUFFER = 8 << 20
HOMES_KEPT = 4096  # affinity keys remembered per family; a forgotten one costs one image encoding
GONE_KEPT = 1024  # tokens of connections that closed, remembered per family (410 rather than 404)


def frame(obj: Any, blob: bytes | bytearray = b"") -> tuple[bytes, bytes, bytes | bytearray]:
    """Head, pickle and blob, sent one after the other: joining them would copy a large body."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEAD.pack(len(data), len(blob)), data, blob


def _widen(sock: socket.socket) -> None:
    """Socket buffers big enough for a large answer in a few reads, not one per 208 KB
    (the kernel caps them at net.core.wmem_max / rmem_max)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


class _Frames:
    """Reassembles frames from a byte stream, reading each part straight into a buffer of its size."""

    def __init__(self):
        self._head = bytearray(_HEAD.size)
        self._pickle = self._blob = bytearray()
        self._target = self._head  # the part being filled
        self._filled = 0

    def buffer(self) -> memoryview:
        """Where the next bytes of the stream go."""
        return memoryview(self._target)[self._filled :]

    def filled(self, nbytes: int) -> tuple[Any, bytearray] | None:
        """Account for ``nbytes`` written into :meth:`buffer`; (obj, blob) once a frame is whole."""
        self._filled += nbytes
        if self._filled < len(self._target):
            return None
        self._filled = 0
        if self._target is self._head:  # a pickle is never empty
            sizes = _HEAD.unpack(self._head)
            self._pickle, self._blob = bytearray(sizes[0]), bytearray(sizes[1])
            self._target = self._pickle
            return None
        if self._target is self._pickle and self._blob:
            self._target = self._blob
            return None
        self._target = self._head
        return pickle.loads(self._pickle), self._blob


@dataclass(frozen=True)
class Withdraw:
    """HTTP process -> worker: nobody waits for request ``uid`` any more; skip it if still queued."""

    uid: int


def timeout_seconds(setting: float | bool | None) -> float | None:
    """LitServe's ``timeout`` setting in seconds; None when there is none (-1, False or None)."""
    return None if setting in (None, -1, False) else float(setting)


def worker_died_reply() -> Reply:
    return Reply.of(
        APIError(
            500,
            "the model worker stopped while handling this request; it is being restarted, retry",
            code="worker_died",
        )
    )


def timed_out_reply() -> Reply:
    return Reply.of(
        APIError(
            504,
            "the request waited in the queue longer than the server's timeout; retry later",
            code="queue_timeout",
        )
    )


class _Link(asyncio.BufferedProtocol):
    """One worker's connection, as the HTTP process sees it: requests out, answers in."""

    def __init__(self, dispatcher: Dispatcher):
        self.dispatcher = dispatcher
        self.worker: int | None = None  # from the worker's first frame
        self.pid: int | None = None
        self.token: str | None = None  # chosen by the worker: what pinned requests name
        self.waiting: dict[int, asyncio.Future | _Parts] = {}
        self.running = 0  # of those, in the batch the worker is computing (it says when it takes one)
        self._frames = _Frames()
        self._transport: asyncio.Transport | None = None
        self._arena: Arena | None = None
        self._arena_fd: int | None = None  # open until the link closes: the worker maps it by /proc

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        _widen(transport.get_extra_info("socket"))
        made = Arena.create(ARENA_BYTES)
        if made is not None:
            self._arena, self._arena_fd = made
            self.send(ArenaOffer(os.getpid(), self._arena_fd, self._arena.capacity))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        whole = self._frames.filled(nbytes)
        if whole is None:
            return
        obj, body = whole
        if self.worker is None:
            self.worker, self.pid, self.token = obj
            self.dispatcher._joined(self)
            return
        if isinstance(obj, int):  # the worker took a batch of that many
            self.running += obj
            return
        uid, reply, where = obj
        reply.body = body if where is None else self._arena.take(*where)
        if reply.more:
            parts = self.waiting.get(uid)
            if parts is not None:
                parts.put(reply)
            return
        self.running = max(self.running - 1, 0)
        waiting = self.waiting.pop(uid, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.dispatcher._left(self)
        if self._arena is not None:
            self._arena.close()
            os.close(self._arena_fd)

    def send(self, obj: Any) -> None:
        self._transport.writelines(frame(obj))


class _Parts:
    """The HTTP process's end of a streamed answer: its parts, queued as they arrive."""

    def __init__(self):
        self.queue: asyncio.Queue[Reply] = asyncio.Queue()
        self.ended = False

    def done(self) -> bool:
        return self.ended

    def put(self, reply: Reply) -> None:
        self.queue.put_nowait(reply)

    def set_result(self, reply: Reply) -> None:
        """The last part (or the worker_died answer)."""
        self.ended = True
        self.queue.put_nowait(reply)


def _load(link: _Link) -> int:
    return len(link.waiting)


class Dispatcher:
    """HTTP process: a family's listening socket, its connected workers and their open requests.

    Workers cache encoded images (SAM 2, SAM 3), each its own. Sending the prompts on one image
    to whichever worker is least busy would encode that image again on every worker it lands
    on (N times the encoder's work and N copies in the caches on N GPUs). So a request may name
    an affinity key (its image): it goes to a worker that was sent that key before (its "home")
    unless that worker has more than ``slack`` requests in flight beyond the least busy one;
    then the least busy worker takes it and becomes a home too. Homes are a hint: a worker that
    evicted the image encodes it again, as without them.
    """

    def __init__(self, family: str, slack: int = 0):
        self.family = family
        self.slack = slack
        self._homes: OrderedDict[Hashable, list[_Link]] = OrderedDict()
        self._dir = tempfile.mkdtemp(prefix=f"visionserve-{family}-")
        self.address = os.path.join(self._dir, "workers.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(64)  # workers that connect before start() wait in the backlog
        self._links: list[_Link] = []
        self._ids = itertools.count()
        self._server: asyncio.Server | None = None
        self._connected: asyncio.Event | None = None
        self._timeout: float | None = None  # seconds a request waits for a worker to connect
        self._unsent = 0  # requests waiting for any worker to connect
        self._seen: set[int] = set()  # worker ids that connected once
        self._gone: OrderedDict[str, None] = OrderedDict()  # tokens of closed connections
        self.restarts = 0  # connections of a worker id seen before: a restarted worker

    async def start(self, timeout: float | bool | None) -> None:
        """Accept workers on the running event loop (the HTTP server's)."""
        self._timeout = timeout_seconds(timeout)
        self._connected = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Link(self), sock=self._listener)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def connected(self) -> int:
        return len(self._links)

    @property
    def queue_depth(self) -> int:
        """Requests no worker has taken into a batch yet (the queue a scaler should watch)."""
        return self._unsent + sum(max(len(link.waiting) - link.running, 0) for link in self._links)

    def pin_state(self, token: str) -> str:
        """ "connected", "gone" (its worker died or restarted) or "unknown" for a connection token."""
        if any(link.token == token for link in self._links):
            return "connected"
        return "gone" if token in self._gone else "unknown"

    async def submit(
        self, job: Any, affinity: Hashable | None = None, stay: bool = False, pin: str | None = None
    ) -> Reply:
        """A worker's answer to ``job``: the least busy one, or a home of ``affinity``. ``stay``:
        only a home can answer (the job names a cached image without carrying it), so it waits
        there however busy. ``pin``: only the connection with that token can answer (worker_died
        if it has gone). Waits for a worker to connect (a restart) up to the queue timeout;
        the worker itself drops a request that waited longer than that before it could start it."""
        sent = time.monotonic()
        link = await self._link_for(sent, affinity, stay, pin)
        if link is None:
            return timed_out_reply() if pin is None else worker_died_reply()
        uid = next(self._ids)
        answer = link.waiting[uid] = asyncio.get_running_loop().create_future()
        link.send((uid, sent, job))
        try:
            return await answer
        except asyncio.CancelledError:
            if link in self._links:
                link.send(Withdraw(uid))
            raise
        finally:
            link.waiting.pop(uid, None)

    async def stream(self, job: Any, pin: str | None = None) -> AsyncIterator[Reply]:
        """A worker's answer to ``job`` in parts, each as it comes; the last has ``more`` unset.
        Closing the iterator early (the client went away) withdraws the job: the worker stops it
        before its next part."""
        sent = time.monotonic()
        link = await self._link_for(sent, None, False, pin)
        if link is None:
            yield timed_out_reply() if pin is None else worker_died_reply()
            return
        uid = next(self._ids)
        parts = link.waiting[uid] = _Parts()
        link.send((uid, sent, job))
        try:
            while True:
                reply = await parts.queue.get()
                yield reply
                if not reply.more:
                    return
        finally:
            link.waiting.pop(uid, None)
            if not parts.ended and link in self._links:
                link.send(Withdraw(uid))

    async def _link_for(
        self, sent: float, affinity: Hashable | None, stay: bool, pin: str | None
    ) -> _Link | None:
        """The link a job goes to; None when none connected in time, or the pinned one has gone."""
        if pin is not None:
            return next((link for link in self._links if link.token == pin), None)
        while not self._links:
            limit = None if self._timeout is None else sent + self._timeout - time.monotonic()
            self._unsent += 1
            try:
                await asyncio.wait_for(self._connected.wait(), limit)
            except TimeoutError:
                return None
            finally:
                self._unsent -= 1
        return self._pick(affinity, stay)

    def _pick(self, affinity: Hashable | None, stay: bool = False) -> _Link:
        least = min(self._links, key=_load)
        if affinity is None:
            return least
        homes = [h for h in self._homes.pop(affinity, ()) if h in self._links]  # gone: restarted
        home = min(homes, key=_load, default=None)
        if stay:  # no home: no worker has it, the least busy one says so (and is no home)
            if homes:
                self._homes[affinity] = homes
            return home or least
        if home is None or _load(home) > _load(least) + self.slack:
            home = least
            homes.append(least)
        self._homes[affinity] = homes  # now the most recently used key
        if len(self._homes) > HOMES_KEPT:
            self._homes.popitem(last=False)
        return home

    def _joined(self, link: _Link) -> None:
        if link.worker in self._seen:
            self.restarts += 1
        self._seen.add(link.worker)
        self._links.append(link)
        self._connected.set()
        log.debug("%s worker %d (pid %d) connected", self.family, link.worker, link.pid)

    def _left(self, link: _Link) -> None:
        self._links.remove(link)
        self._gone[link.token] = None
        if len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)
        if not self._links:
            self._connected.clear()
        if link.waiting:
            log.warning(
                "%s worker %d (pid %d) went away with %d request(s) in flight; they get worker_died",
                self.family,
                link.worker,
                link.pid,
                len(link.waiting),
            )
        for waiting in link.waiting.values():
            if not waiting.done():
                waiting.set_result(worker_died_reply())


class WorkerLink:
    """Worker process: its connection to the HTTP process, read a batch at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._frames = _Frames()
        self._ready: deque = deque()
        self._arena: Arena | None = None  # the HTTP process offers one before any request
        self.token = new_token()  # this connection's: a restarted worker has another
        self.withdrawn: set[int] = set()  # uids withdrawn after they left the queue (streams)

    @classmethod
    def connect(cls, address: str, worker: int) -> WorkerLink:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _widen(sock)
        sock.connect(address)
        link = cls(sock)
        link._send((worker, os.getpid(), link.token))
        return link

    def collect(self, limit: int, window: float, idle_wait: float) -> list:
        """Up to ``limit`` requests ``(uid, sent, job)``. Blocks up to ``idle_wait`` for the
        first ([] if none comes), then takes more until ``window`` seconds after it arrived;
        window 0 takes what is already there. Everything already sent is read first, so a
        request withdrawn while it queued is dropped. Raises EOFError once the server has gone."""
        while self._receive(0.0):
            pass
        if not self._ready:
            deadline = time.monotonic() + idle_wait
            while not self._ready and self._receive(max(deadline - time.monotonic(), 0.0)):
                pass
            if not self._ready:
                return []
        deadline = time.monotonic() + window
        while len(self._ready) < limit and self._receive(max(deadline - time.monotonic(), 0.0)):
            pass
        return [self._ready.popleft() for _ in range(min(limit, len(self._ready)))]

    def started(self, n: int) -> None:
        """Tell the HTTP process this worker took ``n`` requests into a batch (its queue depth)."""
        self._send(n)

    def answer(self, uid: int, reply: Reply) -> None:
        where = self._arena.put(reply.body) if self._arena is not None else None
        self._send((uid, replace(reply, body=b""), where), reply.body if where is None else b"")

    def close(self) -> None:
        self.sock.close()
        if self._arena is not None:
            self._arena.close()

    def _send(self, obj: Any, blob: bytes | bytearray = b"") -> None:
        for part in frame(obj, blob):
            if part:
                self.sock.sendall(part)

    def _receive(self, timeout: float) -> bool:
        """Read what arrives within ``timeout`` (0: what is there now); False if nothing did."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return False
        nbytes = self.sock.recv_into(self._frames.buffer())
        if not nbytes:
            raise EOFError("the HTTP process closed the connection")
        whole = self._frames.filled(nbytes)
        if whole is None:
            return True
        if isinstance(whole[0], ArenaOffer):
            self._arena = whole[0].join()
        elif isinstance(whole[0], Withdraw):
            kept = [item for item in self._ready if item[0] != whole[0].uid]
            if len(kept) < len(self._ready):
                log.info("a request was withdrawn by its client before it ran; dropped")
                self._ready = deque(kept)
            else:
                self.withdrawn.add(whole[0].uid)
        else:
            self._ready.append(whole[0])
        return True
