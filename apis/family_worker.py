"""A family in its worker process: setup on a device, the model cache, running a batch through
the routes' hooks, and the counters that ride back with each answer.

The HTTP process holds the :class:`~apis.family.FamilyAPI` object too (LitServe pickles it into
each worker), so this module is imported there; torch is taken on first use
(:func:`~apis.core.lazy.lazy_module`), which happens only in a worker's ``setup``.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, ClassVar

from apis.core import withdrawal
from apis.core.errors import APIError
from apis.core.images import decode_image
from apis.core.lazy import lazy_module
from apis.core.logs import configure_logging
from apis.core.process import block_imports, die_with_parent, reuse_freed_memory
from apis.core.replies import Reply, Stream
from apis.core.settings import ModelEntry
from apis.core.weights import hub_file, is_hf_uri
from apis.route import Job, Route

if TYPE_CHECKING:
    from apis.config import ServerConfig
    from apis.core.registry import ModelRegistry
    from apis.core.settings import Family

torch = lazy_module("torch")
precision = lazy_module("apis.core.precision")

log = logging.getLogger("visionserve")


class FamilyWorker:
    """The :class:`~apis.family.FamilyAPI` methods that run in a worker: LitServe's ``setup``
    and the hooks our worker loop calls (apis/transport/worker_loop.py) for each batch."""

    family: str
    cfg: ServerConfig
    fam: Family
    registry: ModelRegistry
    handlers: dict[str, Route]
    dtype_name: str
    log_level: str
    stats: Any
    max_batch_size: int
    #: glibc keeps freed memory for the next request (apis/core/process.py): only for families
    #: whose requests measurably gain from it, as the worker then keeps its largest request's
    #: memory (docs/benchmarks.md, Allocator: SAM 3, SAM 2 and DINO; not CLIP, not RMBG)
    reuses_freed_memory: ClassVar[bool] = False
    #: modules no route of the family imports, blocked in its worker before torch loads
    #: (apis/core/process.py): triton, which torchvision brings in through ``torch._dynamo``
    #: although we never compile (82 MB). A family that runs triton kernels keeps it (SAM 3)
    unused_modules: ClassVar[tuple[str, ...]] = ("triton",)

    def setup(self, device: str) -> None:
        die_with_parent()
        block_imports(self.unused_modules, device)
        if self.reuses_freed_memory:
            reuse_freed_memory()
        configure_logging(self.log_level)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        self.torch_device = torch.device(device)
        self.compute_dtype = precision.resolve_dtype(self.dtype_name, device)
        self.worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        self._models: dict[str, Any] = {}
        self._load_seconds: dict[str, float] = {}
        self._requests: dict[str, Counter] = defaultdict(Counter)
        self._batches: dict[str, Counter] = defaultdict(Counter)
        self._forwards: dict[str, Counter] = defaultdict(Counter)
        if self.fam.load == "eager":
            for entry in self.registry.entries:
                self.model(entry)
        self._publish()

    def load_model(self, entry: ModelEntry) -> Any:
        raise NotImplementedError

    def model(self, entry: ModelEntry) -> Any:
        """The worker's one instance of ``entry``, loaded on first use."""
        key = self.registry.id_of(entry)
        if key not in self._models:
            t0 = time.perf_counter()
            if is_hf_uri(entry.weights):  # already in the hub cache: the server fetched it at start-up
                entry = entry.model_copy(update={"weights": hub_file(entry.weights)})
            if entry.is_random:  # same random weights in every worker and after every restart
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(zlib.crc32(key.encode()))
                    self._models[key] = self.load_model(entry)
            else:
                self._models[key] = self.load_model(entry)
            self._load_seconds[key] = time.perf_counter() - t0
            log.info(
                "%s worker %d loaded %s on %s (%s, weights: %s) in %.1fs",
                self.family,
                self.worker_id,
                key,
                self.torch_device,
                str(self.compute_dtype).removeprefix("torch."),
                entry.weights_source,
                self._load_seconds[key],
            )
            if entry.is_random:
                log.warning("%s model %s has RANDOM weights: its outputs are meaningless", self.family, key)
        return self._models[key]

    def housekeeping(self) -> None:
        """Called by the worker's loop when it is idle (about once a second): expire old state."""

    def answer(self, jobs: list[Job]) -> list[Reply | Stream]:
        """The answers to one batch of jobs, in order: the batch grouped by route and model, each
        group through its route's hooks. The worker's loop calls this (apis/transport/worker_loop.py)
        in place of LitServe's decode_request/batch/predict/unbatch/encode_response, which this
        family does not use."""
        results: list[Any] = [None] * len(jobs)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[(job.route, job.model_id)].append(i)
        for (name, model_id), idx in groups.items():
            self._batches[name][len(idx)] += 1
            for i, out in zip(idx, self._run(name, model_id, [jobs[i] for i in idx]), strict=True):
                results[i] = out
        for job, res in zip(jobs, results, strict=True):
            outcome = (
                "ok"
                if not isinstance(res, APIError)
                else ("server_error" if res.status >= 500 else "client_error")
            )
            self._requests[job.route][outcome] += 1
        return [res if isinstance(res, Stream) else self.stamp(Reply.of(res)) for res in results]

    def _run(self, name: str, model_id: str, jobs: list[Job]) -> list:
        try:
            route = self.handlers[name]
            model = self.model(self.registry.by_id(model_id)) if route.uses_model else None
            return self._through(route, model, jobs)
        except APIError as e:
            return [e] * len(jobs)
        except Exception:
            if len(jobs) > 1:  # find the culprit: run each request on its own
                return [out for job in jobs for out in self._run(name, model_id, [job])]
            log.exception("%s/%s failed", self.family, name)
            return [
                APIError(
                    500,
                    f"internal error while running {self.family}/{name} (details are in the server log)",
                    code="internal_error",
                )
            ]

    def _through(self, route: Route, model: Any, jobs: list[Job]) -> list:
        """``route``'s hooks over ``jobs``: the image's pixels and decode each, predict once per
        batch key, encode each."""
        out: list[Any] = [None] * len(jobs)
        groups: dict[Hashable, list[tuple[int, Any]]] = defaultdict(list)
        for i, job in enumerate(jobs):
            try:
                if job.image_bytes is not None:
                    job.image = decode_image(job.image_bytes, self.cfg.limits)
                item = route.decode(model, job)
            except APIError as e:
                out[i] = e
                continue
            groups[route.batch_key(item)].append((i, item))
        for members in groups.values():
            self._forwards[route.name][len(members)] += 1
            try:
                with withdrawal.serving([jobs[i] for i, _ in members]):
                    outputs = route.predict(model, [item for _, item in members])
            except withdrawal.Withdrawn as e:  # nobody waits for these answers any more
                log.info("%s/%s stopped: %s", self.family, route.name, e)
                for i, _ in members:
                    out[i] = APIError(499, "the client closed the request", code="client_closed")
                continue
            for (i, item), output in zip(members, outputs, strict=True):
                try:
                    out[i] = output if isinstance(output, APIError) else route.encode(jobs[i], item, output)
                except APIError as e:
                    out[i] = e
        return out

    def stamp(self, reply: Reply) -> Reply:
        """``reply`` with the worker's counters, which ride back with each answer: fresh in
        /info as soon as the client has its answer, and no IPC round trip per request. A
        stream's last part comes here too (apis/transport/worker_loop.py)."""
        if self.stats is not None:
            reply.stats = (self.stats_key, self._snapshot())
        return reply

    @property
    def stats_key(self) -> str:
        return f"{self.family}/{self.worker_id}"

    def _publish(self) -> None:
        """Post the counters to the server's shared dict (at start-up, before any answer)."""
        if self.stats is not None:
            self.stats[self.stats_key] = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "updated": time.time(),
            "family": self.family,
            "worker": self.worker_id,
            "pid": os.getpid(),
            "device": str(self.torch_device),
            "dtype": str(self.compute_dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),  # from OMP_NUM_THREADS when set (deploy/k8s)
            "models_loaded": sorted(self._models),
            "load_seconds": dict(self._load_seconds),
            "requests": {op: dict(c) for op, c in self._requests.items()},
            "batch_sizes": _histograms(self._batches),
            "forward_batch_sizes": _histograms(self._forwards),
            **gpu_memory(self.torch_device),
            **self.extra_stats(),
        }

    def extra_stats(self) -> dict[str, Any]:
        """Family-specific counters for ``/info`` (caches, encoder calls)."""
        return {}


def gpu_memory(device: torch.device) -> dict[str, dict[str, int]]:
    """Bytes of the GPU that this worker's torch allocator holds (``allocated``: in tensors,
    ``reserved``: cached by the allocator, ``peak_allocated``: the most since start); nothing on
    CPU. onnxruntime's own arena (RMBG) is not seen by torch's allocator."""
    if device.type != "cuda":
        return {}
    return {
        "gpu_memory": {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "peak_allocated": torch.cuda.max_memory_allocated(device),
        }
    }


def _histograms(counters: dict[str, Counter]) -> dict[str, dict[str, int]]:
    return {op: {str(k): v for k, v in sorted(c.items())} for op, c in counters.items()}
