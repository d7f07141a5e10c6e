"""A model worker's main loop: batches from the family's socket through the family's
``answer`` (apis/family_worker.py), over :class:`~apis.transport.dispatch.WorkerLink` instead of
LitServe's queues and hooks. Collection blocks until a request arrives and times the batch window
from that arrival, so an idle worker sleeps (docs/benchmarks.md, Idle CPU).

An answer may be a :class:`~apis.core.replies.Stream` (a video propagation). The loop then
takes turns: each turn it reads what has arrived (new requests, withdrawals), runs a batch of
the new requests, and advances every open stream by ONE part. So several streams interleave, a
short request is answered between two parts of a long one, and a withdrawn stream stops before
its next part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from apis.core import withdrawal
from apis.core.errors import APIError
from apis.core.logs import REQUEST_ID
from apis.core.replies import Reply, Stream
from apis.transport.dispatch import WorkerLink, timed_out_reply, timeout_seconds

log = logging.getLogger("visionserve")
IDLE_WAIT_S = 1.0  # one blocking wait for the first request; the loop then asks again


def serve(lit_api: Any, worker_id: int) -> None:
    """Serve the family's socket (``lit_api.spec.address``) until the HTTP process closes it."""
    link = WorkerLink.connect(lit_api.spec.address, worker_id)
    lit_api.token = link.token  # what pinned state (sessions) is named by
    streams: dict[int, Stream] = {}
    try:
        while True:
            # with streams open, only what has arrived: their next parts are waiting
            wait = 0.0 if streams else IDLE_WAIT_S
            items = link.collect(lit_api.max_batch_size, 0.0 if streams else lit_api.batch_timeout, wait)
            for uid in link.gone & streams.keys():
                log.info("%s: a stream was withdrawn by its client; stopped", lit_api.api_path)
                streams.pop(uid).close()
            link.gone.clear()
            if items:
                link.started(len(items))
            elif not streams:
                lit_api.housekeeping()
            for uid, answer in run_batch(lit_api, items, link.withdrawn):
                if isinstance(answer, Stream):
                    streams[uid] = answer
                else:
                    link.answer(uid, answer)
            for uid in list(streams):
                part = next_part(lit_api, streams[uid])
                if not part.more:
                    del streams[uid]
                link.answer(uid, part)
    except (EOFError, ConnectionError):
        log.info("%s worker %d: the server has gone, stopping", lit_api.api_path, worker_id)
    finally:
        for stream in streams.values():
            stream.close("server gone")
        link.close()


def next_part(lit_api: Any, stream: Stream) -> Reply:
    """The stream's next part; its last one carries the worker's counters. Never raises."""
    try:
        part = stream.next_reply()
    except Exception:
        log.exception("%s: a stream failed after %d part(s)", lit_api.api_path, stream.sent)
        stream.close("failed")
        part = Reply.of(internal_error())
    return part if part.more else lit_api.stamp(part)


def internal_error() -> APIError:
    return APIError(
        500, "internal error in the model worker (details are in the server log)", code="internal_error"
    )


def run_batch(
    lit_api: Any, items: list, withdrawn: Callable[[int], bool] | None = None
) -> list[tuple[int, Reply | Stream]]:
    """``(uid, reply)`` for each collected ``(uid, sent, job)``; never raises. A request that
    waited longer than the server's timeout is answered 504 without running. ``lit_api.answer``
    gives a :class:`~apis.core.replies.Reply`, or a :class:`~apis.core.replies.Stream` whose
    parts the loop sends one per turn. Each reply carries how long its request waited (``sent``
    is the HTTP process's ``time.monotonic()``, one clock for the whole machine) and how long
    its batch computed. ``withdrawn(uid)``: whether a request's client left since; the model
    code asks at its chunk boundaries (apis/core/withdrawal.py)."""
    limit = timeout_seconds(lit_api.request_timeout)
    now = time.monotonic()
    answers: list[tuple[int, Reply | Stream]] = []
    live: list[tuple[int, Any]] = []
    waited: dict[int, float] = {}
    for uid, sent, job in items:
        waited[uid] = now - sent
        if limit is not None and now - sent > limit:
            log.error(
                "%s: a request waited %.1fs (timeout %ss); answered 504", lit_api.api_path, now - sent, limit
            )
            answers.append((uid, replace(timed_out_reply(), queue_s=now - sent)))
        else:
            live.append((uid, job))
    if not live:
        return answers
    timed = len(answers)
    # this batch's log lines name its requests
    token = REQUEST_ID.set(",".join(getattr(job, "request_id", "-") for _, job in live))
    uid_of = {id(job): uid for uid, job in live}

    def gone(job: Any) -> bool:
        return withdrawn is not None and id(job) in uid_of and withdrawn(uid_of[id(job)])

    try:
        with withdrawal.watching(gone):
            replies = lit_api.answer([job for _, job in live])
        answers += [(uid, reply) for (uid, _), reply in zip(live, replies, strict=True)]
    except Exception:
        log.exception("%s: a batch of %d request(s) failed", lit_api.api_path, len(live))
        failed = Reply.of(internal_error())
        answers += [(uid, failed) for uid, _ in live]
    finally:
        REQUEST_ID.reset(token)
    compute = time.monotonic() - now
    # a copy per request: a family may hand back one Reply object for several requests (a
    # stream's timings are its own parts', not this batch's)
    answers[timed:] = [
        (uid, replace(r, queue_s=waited[uid], compute_s=compute) if isinstance(r, Reply) else r)
        for uid, r in answers[timed:]
    ]
    return answers
