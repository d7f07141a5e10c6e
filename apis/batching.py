"""How a worker collects a batch: block until a request arrives, then gather more for up to
``batch_timeout`` from that first arrival.

LitServe 0.2.19 polls its request queue in 1 ms steps (each a round trip to the manager
process) and opens the batch window when the worker becomes free, not when a request comes.
Blocking instead keeps an idle server idle, and the window means what its name says
(Triton's ``max_queue_delay``); 0 takes only what is already waiting.
"""

from __future__ import annotations

import time
from queue import Queue
from typing import Any

from litserve import LitAPI
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType

IDLE_WAIT_S = 1.0  # one blocking wait for the first request; the loop then asks again


class FirstArrivalBatchedLoop(BatchedLoop):
    """LitServe's batched loop with blocking collection and the window timed from the first
    request of a batch."""

    def get_batch_requests(
        self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport
    ) -> tuple[list, list]:
        payloads: list = []
        timed_out: list = []
        item = self.get_request(request_queue, timeout=IDLE_WAIT_S)
        deadline = time.monotonic() + lit_api.batch_timeout
        while item is not None:
            self._admit(item, lit_api, transport, payloads, timed_out)
            if len(payloads) + len(timed_out) >= lit_api.max_batch_size:
                break
            remaining = deadline - time.monotonic()
            item = self.get_request(request_queue, block=remaining > 0, timeout=max(remaining, 0.0))
        return payloads, timed_out

    def _admit(
        self, item: Any, lit_api: LitAPI, transport: MessageTransport, payloads: list, timed_out: list
    ) -> None:
        """What LitServe does with each collected request: stop on the sentinel, tell the HTTP
        process which worker has it (so a dying worker fails it), drop it if it waited too long."""
        if item == _SENTINEL_VALUE:
            raise _StopLoopError()
        response_queue_id, uid, timestamp, x_enc = item
        self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
        limit = lit_api.request_timeout
        if limit not in (-1, False) and time.monotonic() - timestamp > limit:
            timed_out.append((response_queue_id, uid))
        else:
            payloads.append((response_queue_id, uid, x_enc))
