"""What every benchmark shares: start the real server, drive it with concurrent clients, time
in-process calls, and print markdown tables.

The driver is a small asyncio + httpx loop rather than locust: the benchmarks need exact
request counts, per-request latencies and payloads built in Python (base64 images), in the same
process that also times the in-process library call, and locust would add its own process and
web UI on a 2-core machine whose cores the server needs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(config: str | Path, *args: str, timeout: float = 900.0) -> Iterator[str]:
    """``python app.py --config ... --no-auth`` on a free port; yields its base URL."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-server-{port}.log", "w")  # noqa: SIM115
    cmd = [
        sys.executable,
        str(ROOT / "app.py"),
        "--config",
        str(config),
        "--port",
        str(port),
        "--no-auth",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}); see {log.name}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout}s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@dataclass
class Run:
    latencies: list[float]  # seconds, one per request
    wall: float  # seconds for all of them

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall


async def _drive(url: str, payloads: list[dict], concurrency: int, timeout: float) -> Run:
    queue: asyncio.Queue = asyncio.Queue()
    for p in payloads:
        queue.put_nowait(p)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                payload = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post(url, json=payload)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Run(latencies, time.perf_counter() - t0)


def drive(url: str, payloads: list[dict], concurrency: int, timeout: float = 3600.0) -> Run:
    """POST every payload to ``url`` with ``concurrency`` requests in flight; all must succeed."""
    return asyncio.run(_drive(url, payloads, concurrency, timeout))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(
    a: Callable[[], object], b: Callable[[], object], rounds: int
) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` in turns (a, b, b, a, a, b, ...), so drift on a shared machine hits
    both sides alike. One untimed warm-up call of each first."""
    a()
    b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        first, second = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        first[1].append(timed(first[0]))
        second[1].append(timed(second[0]))
    return ta, tb


def p(values: list[float], q: float) -> float:
    """Percentile ``q`` (0-100) by linear interpolation."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def spread(values: list[float]) -> str:
    """Median absolute deviation as a percentage of the median."""
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    return f"±{100 * mad / med:.0f}%" if med else "n/a"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    )
