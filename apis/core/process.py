"""Settings of a model worker's own process (Linux/glibc; skipped elsewhere)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc() -> ctypes.CDLL | None:
    """glibc, for the worker's process settings; None elsewhere (they are then skipped)."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reuse_freed_memory() -> bool:
    """glibc: keep memory a request freed for the next one instead of returning it to the OS.

    By default glibc maps every allocation above 32 MB afresh and unmaps it when freed, so every
    request page-faults its activations again (docs/benchmarks.md, Allocator). The price: a
    process keeps the memory of its largest request, as PyTorch's CUDA allocator does on GPUs.
    Returns False where this is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def die_with_parent() -> None:
    """Linux: have the kernel kill this worker if the server process dies, even by SIGKILL.

    The kernel sends the signal when the thread that started this process ends: LitServe starts
    workers from its main thread, and restarts them from its monitor thread, which lives as long
    as the server. A server that died before this call is caught by comparing the parent with the
    pid that started us, never with 1: in a container the server itself is PID 1.
    """
    parent = multiprocessing.parent_process()
    libc = _libc()
    if parent is None or libc is None:  # not a spawned worker, or not glibc
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent.pid:  # re-parented: the server is already gone
        os._exit(0)


#: NVIDIA's CUDA bindings (``cuda.bindings``), which torch's CUDA build imports where installed:
#: 11 MB in a worker that runs on the CPU, where nothing calls them
CUDA_ONLY = ("cuda",)


def block_imports(names: Iterable[str], device: str) -> None:
    """A spawned worker: make ``import name`` fail for each of ``names`` not imported yet, and
    for :data:`CUDA_ONLY` where ``device`` is not a GPU.

    Python raises ModuleNotFoundError for a module whose ``sys.modules`` entry is None (the
    import system's module cache), and libraries that treat a module as optional go on without
    it: torch does for triton, the GPU kernel compiler that ``torch._dynamo`` imports (and
    torchvision imports ``torch._dynamo``), 82 MB in every worker (docs/benchmarks.md, Memory).
    Only in a spawned worker: a process that runs several families in turn (tests, benchmarks)
    may come to one that needs the module.
    """
    if multiprocessing.parent_process() is None:
        return
    for name in [*names, *(() if device.startswith("cuda") else CUDA_ONLY)]:
        if name not in sys.modules:  # one already imported stays
            sys.modules[name] = None  # type: ignore[assignment]
