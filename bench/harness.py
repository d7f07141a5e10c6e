"""What every benchmark shares: start the real server, drive it with concurrent clients, time
in-process calls, and print markdown tables.

The load generator is a minimal HTTP/1.1 client (keep-alive connections, request bodies
encoded once, responses read as bytes) rather than locust or httpx. The benchmarks need exact
request counts and per-request latencies in the same process that times the in-process call,
and, above all, the client shares this 2-core machine with the server: httpx spends ~2.2 ms of
CPU per request, 15x this client's 0.15 ms, which is CPU the server under test then lacks
(batched ``encode_text`` measured 134 vs 182 requests/s). Latency is "request bytes out to
response bytes in"; turning JSON into Python objects is the client's work, not the server's.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apis.config import WORKER_ENV  # noqa: E402

# In-process sides run with the model workers' thread settings, so both sides of a comparison do
# the same work the same way. Scripts import this module before anything that loads torch.
for _name, _value in WORKER_ENV.items():
    os.environ.setdefault(_name, _value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def env(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (or unset) meanwhile: a server started inside, and its workers,
    inherit it (the before/after sides of a switch the server reads from its environment)."""
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


@contextmanager
def server(config: str | Path, *args: str, timeout: float = 900.0) -> Iterator[str]:
    """``python app.py --config ... --no-auth`` on a free port; yields its base URL."""
    with _serving(
        [sys.executable, str(ROOT / "app.py"), "--config", str(config), "--no-auth", *args], timeout
    ) as url:
        yield url


SIDES = {
    "litserve": "LitServe default (manager queues)",
    "zmq": "LitServe fast_queue (ZeroMQ)",
    "ours": "ours",
}


@contextmanager
def side_server(
    side: str, config: str | Path, families: list[str], routes: list[str] | None = None, cuda: bool = False
) -> Iterator[str]:
    """The families of ``config`` served by one side of the three-sided comparison (``SIDES``):
    ``app.py`` for ours, ``bench/litserve_sides.py`` (one plain LitAPI per route) otherwise.
    ``routes`` (ops) limits what the LitServe sides start a worker for; ours serves every route."""
    if side == "ours":
        placement = ["--accelerator", "cuda", "--devices", "1"] if cuda else []
        with server(config, *(["--models", ",".join(families)] if families else []), *placement) as url:
            yield url
        return
    cmd = [
        sys.executable,
        "-m",
        "bench.litserve_sides",
        "--config",
        str(config),
        "--families",
        ",".join(families),
    ]
    cmd += ["--routes", ",".join(routes)] if routes else []
    cmd += ["--fast-queue"] if side == "zmq" else []
    cmd += ["--accelerator", "cuda"] if cuda else []
    with _serving(cmd, 900.0) as url:
        yield url


@contextmanager
def floor_server() -> Iterator[str]:
    """``bench/floor.py``: uvicorn alone, answering ``POST /<N>`` with N bytes."""
    with _serving([sys.executable, "-m", "bench.floor"], 60.0) as url:
        yield url


@contextmanager
def _serving(cmd: list[str], timeout: float) -> Iterator[str]:
    """Run ``cmd --port <free port>`` from the repository root until ``/health`` answers 200."""
    port = free_port()
    with running([*cmd, "--port", str(port)], port, timeout=timeout) as url:
        yield url


@contextmanager
def running(
    cmd: list[str],
    port: int,
    *,
    timeout: float,
    ready_path: str = "/health",
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    log: Path | None = None,
) -> Iterator[str]:
    """Run ``cmd`` (which serves on ``port``) in its own process group until ``ready_path``
    answers 200; yield its base URL; afterwards SIGTERM it, then SIGKILL what is left of its group
    (plain LitServe dies on SIGTERM and leaves its queue manager behind). Its output goes to
    ``log`` (default: bench-server-<port>.log in $TMPDIR)."""
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-server-{port}.log"
    out = open(log, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}); see {log}")
            with suppress(requests.ConnectionError):
                if requests.get(url + ready_path, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[0]} not ready after {timeout}s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out.close()


@dataclass
class Run:
    latencies: list[float]  # seconds, one per request
    wall: float  # seconds for all of them

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall


def encode(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def _request_head(path: str, host: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


async def _drive(url: str, bodies: list[bytes], concurrency: int) -> Run:
    parts = urlsplit(url)
    todo = iter(bodies)
    latencies: list[float] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for body in todo:
                t0 = time.perf_counter()
                writer.write(_request_head(parts.path, parts.netloc, body) + body)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                data = await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if head[9:12] != b"200":
                    raise RuntimeError(f"{url}: {head[:12].decode()}: {data[:300]!r}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return Run(latencies, time.perf_counter() - t0)


def drive(url: str, payloads: list[dict], concurrency: int) -> Run:
    """POST every payload to ``url`` over ``concurrency`` keep-alive connections; all must
    succeed. Bodies are encoded before the clock starts."""
    return asyncio.run(_drive(url, [encode(p) for p in payloads], concurrency))


class Client:
    """One keep-alive connection for timing requests one at a time."""

    IDLE_S = 2.0  # uvicorn closes a connection idle for 5 s; reconnect before that can bite

    def __init__(self, url: str):
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)
        self._used = 0.0

    def post(self, path: str, body: bytes) -> bytes:
        """The response bytes of a POST of an encoded JSON body; raises unless 200."""
        if time.monotonic() - self._used > self.IDLE_S:
            self._conn.close()  # the next request opens a new one
        self._conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = self._conn.getresponse()
        data = resp.read()
        self._used = time.monotonic()
        if resp.status != 200:
            raise RuntimeError(f"{path}: HTTP {resp.status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self._conn.close()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(
    a: Callable[[], object], b: Callable[[], object], rounds: int, block: int = 3
) -> tuple[list[float], list[float]]:
    """Steady-state latency of one caller of ``a`` and one of ``b``, taken in turns.

    Each round runs a block of back-to-back calls per side, in the order a, b, b, a, a, b, ... so
    drift on a shared machine hits both sides alike. The first call of a block is not timed: it
    pays for what the other side left behind (torch's OpenMP threads spin on for a while after
    a call, and on two cores that lands on whoever runs next) and for waking an idle path.
    """
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        for fn, times in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            fn()
            times.extend(timed(fn) for _ in range(block))
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


def ran(detail: str) -> str:
    """The line above every table: the exact command, the machine, and how it was measured."""
    return f"\n`{' '.join(['python', *sys.argv])}` on {machine()}; {detail}\n"


def machine() -> str:
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    )
