"""Answers as the HTTP process sends them, rendered by the worker that made them.

A worker turns each result into its response body (JSON by orjson, or ``.npy`` bytes) and the
HTTP process sends that body as it came off the worker's socket: the event loop, which every
other request waits for, never renders or unpickles a multi-MB answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from apis.core.errors import APIError

log = logging.getLogger("visionserve")
JSON_MEDIA_TYPE = "application/json"
NPY_MEDIA_TYPE = "application/x-npy"
NDJSON_MEDIA_TYPE = "application/x-ndjson"


@dataclass
class Reply:
    status: int
    body: bytes | bytearray
    media_type: str = JSON_MEDIA_TYPE
    headers: dict[str, str] = field(default_factory=dict)
    stats: tuple[str, dict] | None = None  # the answering worker's counters, for /info
    # Seconds the request waited before a worker took it, and its batch's compute time (None:
    # not run), measured by the worker for the queue-wait and compute histograms of /metrics.
    queue_s: float | None = None
    compute_s: float | None = None
    more: bool = False  # a part of a streamed answer (:class:`Stream`) with more parts to come

    @classmethod
    def of(cls, result: dict | APIError | Reply) -> Reply:
        """A route's result (an answer dict, an error, or a Reply already made) as a Reply."""
        if isinstance(result, Reply):
            return result
        if isinstance(result, APIError):
            return cls(result.status, result.render())
        where = non_finite_at(result)
        if where is not None:  # orjson would have written null: a bug must not reach clients as data
            return cls.of(non_finite(where))
        return cls(200, orjson.dumps(result))

    @classmethod
    def npy(cls, data: bytes, meta: dict[str, Any]) -> Reply:
        """A body that IS a ``.npy`` file; ``meta`` travels as ``X-Visionserve-*`` headers."""
        headers = {f"X-Visionserve-{k.replace('_', '-')}": str(v) for k, v in meta.items()}
        return cls(200, data, NPY_MEDIA_TYPE, headers)


def non_finite(where: str) -> APIError:
    """The 500 that replaces an answer carrying NaN or infinity (logged: it is a server fault)."""
    log.error("an answer carried NaN or infinite values at %s; answered 500 instead", where)
    return APIError(
        500,
        f"the model produced NaN or infinite values ({where}); the answer was withheld. This is a "
        "server fault, not the request's (details are in the server log)",
        code="non_finite_output",
    )


def non_finite_at(value: Any, path: str = "answer") -> str | None:
    """Where the first NaN or infinite float in a JSON-able answer is, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(item, (float, dict, list, tuple)):
            where = non_finite_at(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
            if where is not None:
                return where
    return None


class Stream:
    """An answer in parts: each item of ``parts`` (a JSON-able dict) is one NDJSON line.

    The worker's loop (apis/transport/worker_loop.py) renders one part per turn and sends it at
    once, so the streams of several requests interleave and new requests are taken between
    parts. An APIError raised by ``parts`` ends the stream with that error as its last part.
    ``on_close`` runs once however the stream ends: done, failed or withdrawn by its client.
    """

    def __init__(self, parts: Iterator[dict], on_close: Callable[[str], None] | None = None):
        self._parts = parts
        self._on_close = on_close
        self.sent = 0  # parts rendered

    def next_reply(self) -> Reply:
        """The next part (``more`` set), or the end: an empty body, or an error's."""
        try:
            part = next(self._parts)
        except StopIteration:
            self.close("done")
            return Reply(200, b"", NDJSON_MEDIA_TYPE)
        except APIError as e:
            self.close("failed")
            return Reply.of(e)
        where = non_finite_at(part)
        if where is not None:
            self.close("failed")
            return Reply.of(non_finite(where))
        self.sent += 1
        return Reply(200, orjson.dumps(part, option=orjson.OPT_APPEND_NEWLINE), NDJSON_MEDIA_TYPE, more=True)

    def close(self, how: str = "withdrawn") -> None:
        """Stop computing parts (the generator's ``finally`` runs) and say how it ended."""
        close = getattr(self._parts, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(how)
