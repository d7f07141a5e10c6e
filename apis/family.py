"""What every model family shares: one LitAPI per family serving several routes through one queue.

A family's routes (``/clip/extract``, ``/clip/encode_text``, ...) are endpoints of one
:class:`~apis.family_http.FamilyEndpoints`, so one worker process holds ONE copy of each model however
many routes use it. The LitAPI object lives in both processes (LitServe pickles it into each
worker); its code is split by where it runs, where it is cheapest to refuse bad input:

* HTTP process (apis/family_http.py, :meth:`FamilyFront.job_for`): pydantic validation, model
  lookup, reading the image bytes and checking the image header. Errors answer at once and never
  reach a worker. No torch is imported there.
* worker (apis/family_worker.py, ``setup`` and ``answer``): pixel decoding and the model,
  through each :class:`Route`'s hooks (decode, predict, encode), the only hooks: the worker's
  loop (apis/transport/worker_loop.py) calls ``answer``, not LitServe's decode_request/predict.
  Each request's failure is carried as a value, so one bad request never fails the others in its
  batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import litserve as ls
from pydantic import BaseModel

from apis.config import ServerConfig
from apis.core.registry import Key, ModelRegistry, canonical
from apis.family_http import FamilyEndpoints, FamilyFront
from apis.family_worker import FamilyWorker
from apis.litserve_internals import WorkerLoop
from apis.route import Job, Route

__all__ = ["FamilyAPI", "Job", "Route"]


class FamilyAPI(FamilyFront, FamilyWorker, ls.LitAPI):
    """Base LitAPI of a model family. Subclasses set the class attributes, list their
    :class:`Route` classes and implement :meth:`load_model`."""

    family: ClassVar[str]
    routes: ClassVar[tuple[type[Route], ...]]
    selector: ClassVar[type[BaseModel]]  # the request fields that pick a model (a mixin of every request)
    model_key: Callable[..., Key] = staticmethod(canonical)
    model_fill_defaults: ClassVar[bool] = True  # see ModelRegistry.resolve

    def __init__(self, cfg: ServerConfig, dtype: str = "auto", log_level: str = "info"):
        fam = cfg.families()[self.family]
        super().__init__(
            max_batch_size=fam.max_batch_size,
            batch_timeout=fam.batch_timeout,
            spec=FamilyEndpoints(self),
            loop=WorkerLoop(),
        )
        self.cfg = cfg
        self.fam = fam
        self.dtype_name = dtype
        self.log_level = log_level
        self.handlers: dict[str, Route] = {route.name: route(self) for route in self.routes}
        self.registry = ModelRegistry(
            self.family,
            fam.models,
            self.selector_fields(),
            key=self.model_key,
            fill_defaults=self.model_fill_defaults,
        )
        self.stats: Any = None  # shared dict, set by the server before workers start
        self.token: str | None = None  # worker: its connection's token (apis/transport/worker_loop.py)
        self.live_stats: dict[str, dict] = {}  # HTTP process: counters that came with answers
