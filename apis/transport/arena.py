"""Shared memory for answer bodies, from a model worker to the HTTP process.

A multi-MB answer written to a Unix socket travels as many small kernel buffers, and a reader on
another core wakes for each one (docs/benchmarks.md, Serving). Through an arena the body is one
copy on each side and the socket carries one small frame.

The HTTP process makes one arena per connected worker (a memfd: outside /dev/shm and its size
limit, memory only for the pages touched) and offers it in its first frame; the worker maps it
through ``/proc/<pid>/fd/<n>``. Where that cannot work (no memfd, /proc not readable) answers
keep travelling through the socket, as do bodies that do not fit.

The arena is a ring with one writer (the worker) and one reader (the HTTP process), both in
order. Positions are byte counts since the start, never reset; the reader publishes how far it
has copied in the first 8 bytes, one aligned store the writer reads whole. When the reader has
caught up, the next body starts again at offset 0, so one request at a time touches only the
pages of one body.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass

log = logging.getLogger("visionserve")

ARENA_BYTES = 64 << 20  # per worker: a batch of 8 SAM 2 answers with float32 masks fits
_HEAD = 64  # the reader's position, alone on its cache line


class Arena:
    """One side's view of the ring."""

    def __init__(self, mm: mmap.mmap, capacity: int):
        self._mm = mm
        self._released = ctypes.c_uint64.from_buffer(mm)  # how far the reader has copied
        self.capacity = capacity
        self._written = 0  # writer only: where the last body ended

    @classmethod
    def create(cls, capacity: int) -> tuple[Arena, int] | None:
        """HTTP process: a new arena and its file descriptor (to offer), or None without memfd."""
        if not hasattr(os, "memfd_create"):
            return None
        fd = -1
        try:
            fd = os.memfd_create("visionserve-answers")
            os.ftruncate(fd, _HEAD + capacity)
            return cls(mmap.mmap(fd, _HEAD + capacity), capacity), fd
        except OSError as e:  # out of file descriptors or memory: the socket still works
            log.warning("cannot make an answer arena (%s); answers go through the socket", e)
            if fd >= 0:
                os.close(fd)
            return None

    def put(self, body: bytes | bytearray) -> tuple[int, int] | None:
        """Worker: copy ``body`` in; its (start, end) positions, or None when it does not fit now."""
        n, cap = len(body), self.capacity
        released = self._released.value
        if released == self._written:  # nothing left unread: begin again at offset 0
            start = -(-self._written // cap) * cap
            fits = n <= cap
        else:
            offset = self._written % cap
            start = self._written if offset + n <= cap else self._written + cap - offset
            fits = start + n - released <= cap
        if not fits:
            return None
        at = _HEAD + start % cap
        self._mm[at : at + n] = body
        self._written = start + n
        return start, start + n

    def take(self, start: int, end: int) -> bytes:
        """HTTP process: a copy of the body at (start, end); its space is free again after."""
        at = _HEAD + start % self.capacity
        body = self._mm[at : at + end - start]
        self._released.value = end
        return body

    def close(self) -> None:
        del self._released  # the mmap cannot close while ctypes holds its buffer
        self._mm.close()


@dataclass(frozen=True)
class ArenaOffer:
    """The HTTP process's first frame to a worker: where its arena is."""

    pid: int
    fd: int
    capacity: int

    def join(self) -> Arena | None:
        """Worker: map the offered arena; None (answers go through the socket) if it cannot."""
        try:
            fd = os.open(f"/proc/{self.pid}/fd/{self.fd}", os.O_RDWR)
        except OSError as e:
            log.warning("cannot map the HTTP process's answer arena (%s); answers go through the socket", e)
            return None
        try:
            return Arena(mmap.mmap(fd, _HEAD + self.capacity), self.capacity)
        finally:
            os.close(fd)
