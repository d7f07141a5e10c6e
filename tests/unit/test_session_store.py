"""The session store of video tracking (apis/core/sessions.py) on a fake clock: no model."""

from __future__ import annotations

import pytest

from apis.core.errors import APIError
from apis.core.sessions import SessionStore, worker_token


class FakeSession:
    num_frames, width, height, live = 3, 64, 48, False

    def __init__(self):
        self.closed = False

    def describe(self) -> dict:
        return {"num_frames": 3, "objects": [], "memory_bytes": 1000, "frames_held": 3}

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def opened(store: SessionStore) -> tuple[str, FakeSession]:
    sid, session = store.reserve(), FakeSession()
    store.add(sid, session, "m")
    return sid, session


def error(call) -> APIError:
    with pytest.raises(APIError) as e:
        call()
    return e.value


def test_ids_name_their_worker():
    store = SessionStore("0123abcd", 2, 60)
    sid = store.reserve()
    assert worker_token(sid) == "0123abcd"
    assert worker_token("0123abcd-short") is None and worker_token("../../etc-passwd0000000000") is None


def test_least_recently_used_is_evicted_410_and_busy_ones_are_kept_429():
    clock = Clock()
    store = SessionStore("0123abcd", 2, 60, clock)
    (a, sa), (b, _) = opened(store), opened(store)
    clock.now = 1
    store.get(a)  # a is now the most recently used
    c, _ = opened(store)
    assert error(lambda: store.get(b)).status == 410
    assert "max_sessions 2" in error(lambda: store.get(b)).message
    assert not sa.closed and store.stats()["evictions"] == {"lru": 1, "idle": 0}
    for sid in (a, c):
        store.get(sid).busy = True
    e = error(store.reserve)
    assert (e.status, e.code) == (429, "too_many_sessions") and "2" in e.message
    assert error(lambda: store.usable(a)).status == 409


def test_idle_sessions_expire_404_unless_propagating():
    clock = Clock()
    store = SessionStore("0123abcd", 4, 60, clock)
    (a, sa), (b, sb) = opened(store), opened(store)
    store.get(b).busy = True
    clock.now = 61
    assert store.expire() == 1 and sa.closed and not sb.closed
    e = error(lambda: store.get(a))
    assert (e.status, e.code) == (404, "session_not_found")
    stats = store.stats()
    assert stats["count"] == 1 and stats["memory_bytes"] == 1000 and stats["sessions"][0]["session_id"] == b
    store.get(b).busy = False
    store.remove(b)
    assert sb.closed and error(lambda: store.get(b)).status == 404
