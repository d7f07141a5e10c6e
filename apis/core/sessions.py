"""The tracking sessions one worker holds (SAM 2 and SAM 3 video): limits, LRU and idle-TTL
eviction, memory. No HTTP and no model: a session is any object with ``describe()`` and
``close()`` (apis/sam2/video.py's ``VideoSession``).

A session id is ``<worker token>-<random>``. The token is the worker's connection token
(apis/transport/dispatch.py), so the HTTP process routes every later call of a session to the
worker that holds it, and knows, when that worker has gone, that the session is lost (410) and
not unknown (404). Ids of evicted sessions are remembered (a bounded number) for the same reason.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from apis.core.errors import APIError

TOKEN_CHARS = 8  # hex digits of a worker token
SESSION_ID = re.compile(rf"^([0-9a-f]{{{TOKEN_CHARS}}})-[A-Za-z0-9_-]{{16}}$")
EVICTED_KEPT = 1024  # evicted ids remembered per worker (410 instead of 404)


def new_token() -> str:
    return secrets.token_hex(TOKEN_CHARS // 2)


def worker_token(session_id: str) -> str | None:
    """The token of the worker that made ``session_id``; None when it is no session id."""
    found = SESSION_ID.match(session_id)
    return found.group(1) if found else None


def not_found(session_id: str) -> APIError:
    return APIError(
        404,
        f"no video session {session_id!r}: it never existed, was deleted, or expired after being idle; "
        "start a new one with POST .../video/sessions",
        param="session_id",
        code="session_not_found",
    )


def lost(session_id: str, why: str) -> APIError:
    return APIError(
        410,
        f"video session {session_id!r} is gone: {why}. Its tracking state cannot be recovered; start a new "
        "session with POST .../video/sessions and prompt again",
        param="session_id",
        code="session_lost",
    )


@dataclass
class Entry:
    """A session as the store keeps it."""

    session: Any
    model: str
    created: float
    used: float
    busy: bool = False  # a propagation is streaming: other calls wait for it to end or be withdrawn
    closed: bool = False
    last_propagation: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # session.describe() after its last change

    def refresh(self) -> None:
        """Describe the session again (after a call that changed it): /info's counters read this
        copy, so an answer's counters never walk every session's tensors."""
        if not self.closed:
            self.summary = self.session.describe()


class SessionStore:
    """One worker's sessions, least recently used first."""

    def __init__(
        self,
        token: str,
        max_sessions: int,
        idle_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.token = token
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._evicted: OrderedDict[str, str] = OrderedDict()  # id -> why
        self.evictions = {"lru": 0, "idle": 0}

    def reserve(self) -> str:
        """Room for one more session (expired ones closed, then the least recently used idle one
        evicted) and its new id; 429 when every session is busy propagating."""
        self.expire()
        if len(self._entries) >= self.max_sessions:
            idle = next((sid for sid, e in self._entries.items() if not e.busy), None)
            if idle is None:
                raise APIError(
                    429,
                    f"this worker holds its limit of {self.max_sessions} video sessions (video.max_sessions) "
                    "and every one is propagating; retry when one ends, or delete one",
                    code="too_many_sessions",
                )
            self._drop(
                idle,
                "evicted to make room for a newer session (video.max_sessions "
                f"{self.max_sessions} per worker, least recently used first)",
                "lru",
            )
        return f"{self.token}-{secrets.token_urlsafe(12)}"

    def add(self, session_id: str, session: Any, model: str) -> Entry:
        now = self._clock()
        entry = self._entries[session_id] = Entry(session, model, now, now)
        entry.refresh()
        return entry

    def get(self, session_id: str, *, touch: bool = True) -> Entry:
        """The live session; 404 if unknown or expired, 410 if evicted."""
        self.expire()
        entry = self._entries.get(session_id)
        if entry is None:
            why = self._evicted.get(session_id)
            raise not_found(session_id) if why is None else lost(session_id, why)
        if touch:
            entry.used = self._clock()
            self._entries.move_to_end(session_id)
        return entry

    def touch(self, entry: Entry) -> None:
        entry.used = self._clock()

    def usable(self, session_id: str) -> Entry:
        """The session for a call that changes it: 409 while a propagation of it streams."""
        entry = self.get(session_id)
        if entry.busy:
            raise APIError(
                409,
                f"video session {session_id!r} is propagating; wait for that stream to end (or close it) "
                "before prompting, adding frames or propagating again",
                param="session_id",
                code="session_busy",
            )
        return entry

    def remove(self, session_id: str) -> None:
        entry = self.get(session_id, touch=False)
        del self._entries[session_id]
        entry.closed = True
        entry.session.close()

    def expire(self) -> int:
        """Close the sessions idle longer than the TTL (not those propagating); how many."""
        limit = self._clock() - self.idle_ttl_s
        old = [sid for sid, e in self._entries.items() if e.used < limit and not e.busy]
        for sid in old:
            entry = self._entries.pop(sid)
            entry.closed = True
            entry.session.close()
            self.evictions["idle"] += 1
        return len(old)

    def _drop(self, session_id: str, why: str, kind: str) -> None:
        entry = self._entries.pop(session_id)
        entry.closed = True
        entry.session.close()
        self.evictions[kind] += 1
        self._evicted[session_id] = why
        if len(self._evicted) > EVICTED_KEPT:
            self._evicted.popitem(last=False)

    def expires_in(self, entry: Entry) -> float:
        return max(entry.used + self.idle_ttl_s - self._clock(), 0.0)

    def describe(self, session_id: str, entry: Entry) -> dict[str, Any]:
        now = self._clock()
        if not entry.busy:
            entry.refresh()
        return {
            "session_id": session_id,
            "model": entry.model,
            **entry.summary,
            "width": entry.session.width,
            "height": entry.session.height,
            "live": entry.session.live,
            "propagating": entry.busy,
            "idle_s": round(now - entry.used, 3),
            "expires_in": round(self.expires_in(entry), 3),
            "age_s": round(now - entry.created, 3),
            "last_propagation": entry.last_propagation or None,
        }

    def stats(self) -> dict[str, Any]:
        """For /info and /metrics: the count, limits, evictions and each session's memory."""
        now = self._clock()
        sessions = [
            {
                "session_id": sid,
                **{k: e.summary.get(k) for k in ("num_frames", "frames_held", "memory_bytes")},
                "idle_s": round(now - e.used, 3),
            }
            for sid, e in self._entries.items()
        ]
        return {
            "count": len(sessions),
            "max_sessions": self.max_sessions,
            "idle_ttl_s": self.idle_ttl_s,
            "memory_bytes": sum(s["memory_bytes"] or 0 for s in sessions),
            "evictions": dict(self.evictions),
            "sessions": sessions,
        }
