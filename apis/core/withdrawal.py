"""Stop computing for clients that left, at the next chunk boundary.

A client that disconnects has its request withdrawn (apis/transport/dispatch.py sends a
``Withdraw`` frame). A worker that has not started the request drops it; one that is computing
it learns it here: the worker loop says how to ask whether a job was withdrawn
(:func:`watching`), the family says which jobs the model code is computing now
(:func:`serving`), and a long model loop calls :func:`check` between chunks (SAM 2 auto_mask
point batches, SAM 3 prompt chunks). Once every job being computed is withdrawn, :func:`check`
raises :class:`Withdrawn` and the computation stops; a chunk that also serves a client still
waiting runs on. Outside a worker (tests, benchmarks) :func:`check` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_IS_GONE: ContextVar[Callable[[Any], bool] | None] = ContextVar("visionserve_is_gone", default=None)
_SERVING: ContextVar[Sequence[Any]] = ContextVar("visionserve_serving", default=())


class Withdrawn(Exception):  # noqa: N818 (a state, not an error: nobody waits for the answer)
    """Every request the running computation serves was withdrawn by its client."""


@contextmanager
def watching(is_gone: Callable[[Any], bool]) -> Iterator[None]:
    """While a batch runs: ``is_gone(job)`` says whether that job's client left."""
    token = _IS_GONE.set(is_gone)
    try:
        yield
    finally:
        _IS_GONE.reset(token)


@contextmanager
def serving(jobs: Sequence[Any]) -> Iterator[None]:
    """The jobs that the model code called inside computes for."""
    token = _SERVING.set(jobs)
    try:
        yield
    finally:
        _SERVING.reset(token)


def check() -> None:
    """Raise :class:`Withdrawn` when every job being computed was withdrawn (a chunk boundary)."""
    is_gone, jobs = _IS_GONE.get(), _SERVING.get()
    if is_gone is not None and jobs and all(is_gone(job) for job in jobs):
        raise Withdrawn(f"{len(jobs)} request(s) withdrawn by their clients")
