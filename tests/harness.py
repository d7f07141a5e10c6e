"""In-process route harness: a family's API from a config, set up on the CPU, and requests run
through it as one worker batch, with no server, no subprocess and no LitServer.

A request takes the path it takes in a server, by the family's public entry points: the HTTP
half validates it and builds its job (``job_for``), then the worker half runs the jobs as one
batch (``run_batch``, the worker loop's own function, which calls the family's ``answer``: its
routes' decode, predict and encode). A test gets the :class:`~apis.core.replies.Reply` a client
would, a second after the models are built instead of after a server's start-up. Every call into
apis/ of that path is in this file, so a change of either half's entry points is adapted here once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from apis.config import load_config
from apis.core.replies import Reply
from apis.families import FAMILIES
from apis.transport.worker_loop import run_batch

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def family(name: str, config: str | Path = DEMO, **settings: Any) -> Any:
    """The family's API (a :class:`~apis.family.FamilyAPI`) from ``config``'s section, with
    ``settings`` set on that section, after the worker's ``setup("cpu")``: with ``load: eager``
    its models are loaded."""
    cfg = load_config(config)
    for key, value in settings.items():
        setattr(getattr(cfg, name), key, value)
    api = FAMILIES[name].api_class()(cfg)
    api.setup("cpu")
    return api


@cache
def demo(name: str) -> Any:
    """:func:`family` on configs/demo.yaml (tiny models, seeded random weights), once per process."""
    return family(name)


def loaded(api: Any, index: int = 0) -> Any:
    """The model the worker loaded for the family's ``index``-th configured model (the default
    first), for a reference computed with the library on the same weights."""
    return api.model(api.registry.entries[index])


def run(api: Any, route: str, bodies: Sequence[dict]) -> list[Reply]:
    """The replies to ``bodies`` (JSON bodies of ``POST /<family>/<route>``) run as one batch.
    A request refused in the HTTP half raises its APIError, as the server answers it at once."""
    handler = api.handlers[route]
    jobs = [api.job_for(handler, handler.request.model_validate(body)) for body in bodies]
    sent = time.monotonic()
    return [reply for _, reply in run_batch(api, [(i, sent, job) for i, job in enumerate(jobs)])]


def json_of(reply: Reply) -> dict:
    """A reply's JSON answer; fails on an error status, showing the error."""
    assert reply.status == 200, bytes(reply.body).decode()
    return orjson.loads(reply.body)


def call(api: Any, route: str, body: dict) -> dict:
    """One request's JSON answer (:func:`run` with one body, then :func:`json_of`)."""
    (reply,) = run(api, route, [body])
    return json_of(reply)
