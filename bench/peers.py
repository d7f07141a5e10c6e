"""visionserve side by side with a peer server on the same workloads, one server at a time.

    python bench/peers.py --peer infinity|roboflow [--rounds 2] [--venvs DIR] [--work DIR]

Each round starts the peer (in its own virtualenv, never the server's), runs every workload on
it, stops it, then does the same with visionserve; the order flips every round (A, B, B, A) so
drift on a shared machine hits both alike. Load is closed-loop: ``c`` keep-alive connections,
each sending its next request when the previous answer is in (bench/harness.py ``drive``).
The table gives the median requests/s over the rounds, the p50 latency over all of them, the
ratio, and the server's CPU time per request (all its processes; unlike requests/s, other jobs on
the machine barely move it); a workload may add an in-process "model alone" row (the model's
own speed, measured in turns with the servers, for judging a model-bound row). The CPU and the
load average before/after are printed with the table.

A peer is a module ``bench/peer_<name>.py`` (imported by name, so a new peer needs no edit
here) offering:

- ``NAME: str``: what the table calls it, with its version (``"infinity-emb 0.0.78"``).
- ``READY_PATH: str``: a GET path that answers 200 once the peer serves (``"/health"``).
- ``install(venv: Path) -> None``: create ``venv`` and install the peer into it; cheap when it
  is already there (the venv is kept between runs).
- ``prepare(venv: Path, workdir: Path) -> None``: build what the peer loads (model files, random
  weights, nothing downloaded) under ``workdir``; cheap when it is already there.
- ``command(venv: Path, workdir: Path, port: int) -> tuple[list[str], dict[str, str]]``: the
  command that serves the peer on 127.0.0.1:``port`` without auth, and the environment variables
  to add. It runs with ``cwd=workdir`` in its own session; stopped by SIGTERM, then SIGKILL of
  its process group. Its output goes to ``workdir/peer-<port>.log``.
- ``ours_config(workdir: Path) -> dict``: the visionserve config (the YAML as a dict) with the
  same architecture sizes; served by ``app.py --no-auth``.
- ``workloads(workdir: Path) -> list[Workload]``: the rows (see ``Workload``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Run, drive, free_port, machine, ms, p, running, server, spread, table  # noqa: E402

CACHE = Path.home() / ".cache" / "visionserve" / "peers"


@dataclass
class Workload:
    """One row: the same work sent to both servers, ``requests`` per run at ``concurrency``.

    Bodies are cycled to make up ``requests``. ``model_alone`` is optional: a call that does the
    model work of ``model_alone_requests`` requests in this process (run after the servers are
    stopped), shown as requests/s in a row of its own."""

    name: str
    concurrency: int
    requests: int
    peer_path: str
    peer_bodies: list[dict]
    ours_path: str
    ours_bodies: list[dict]
    model_alone: Callable[[], object] | None = None
    model_alone_requests: int = 1
    model_alone_label: str = "model alone, in-process"
    runs: dict[str, list[Run]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # server CPU s per request, per run
    alone: list[float] = field(default_factory=list)  # model_alone's requests/s, one per round


def load_peer(name: str):
    """``bench.peer_<name>``: the module offering the interface in this file's docstring."""
    try:
        return importlib.import_module(f"bench.peer_{name}")
    except ModuleNotFoundError as e:
        if e.name != f"bench.peer_{name}":
            raise  # the peer module exists but something it imports does not
        found = sorted(p.stem.removeprefix("peer_") for p in Path(__file__).parent.glob("peer_*.py"))
        raise SystemExit(
            f"no peer {name!r}: bench/peer_{name}.py does not exist (peers here: {found})"
        ) from None


@contextmanager
def serving(peer, venv: Path, work: Path, timeout: float = 900.0) -> Iterator[str]:
    """Run the peer's command on a free port until its ``READY_PATH`` answers 200; yield the base
    URL; stop it and everything in its process group afterwards."""
    port = free_port()
    cmd, extra_env = peer.command(venv, work, port)
    log = work / f"peer-{port}.log"
    with running(
        cmd, port, timeout=timeout, ready_path=peer.READY_PATH, env=extra_env, cwd=work, log=log
    ) as url:
        yield url


def server_processes(url: str) -> list[psutil.Process]:
    """The server on ``url``'s port: the child of this process that the listener descends from,
    and all its descendants (model workers)."""
    port = int(url.rsplit(":", 1)[1])
    pid = next(
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    )
    root = psutil.Process(pid)
    while root.ppid() != os.getpid():
        root = root.parent()
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time the server has used so far, all its processes together."""
    total = 0.0
    for proc in procs:
        with suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def run_all(url: str, side: str, loads: list[Workload]) -> None:
    """One warm-up request per workload, then every workload once; results go to ``runs`` and
    the server's CPU seconds per request to ``cpu`` (what contention on a shared machine does
    not change, unlike requests/s)."""
    procs = server_processes(url)
    for w in loads:
        path, bodies = (w.peer_path, w.peer_bodies) if side == "peer" else (w.ours_path, w.ours_bodies)
        drive(url + path, bodies[:1], 1)
    for w in loads:
        path, bodies = (w.peer_path, w.peer_bodies) if side == "peer" else (w.ours_path, w.ours_bodies)
        batch = [bodies[i % len(bodies)] for i in range(w.requests)]
        cpu0 = cpu_seconds(procs)
        run = drive(url + path, batch, w.concurrency)
        w.runs.setdefault(side, []).append(run)
        w.cpu.setdefault(side, []).append((cpu_seconds(procs) - cpu0) / w.requests)
        print(
            f"{side:5} {w.name}: {run.throughput:.2f} req/s, {w.cpu[side][-1] * 1000:.0f} CPU ms/request",
            flush=True,
        )


def model_alone_rates(loads: list[Workload], repeats: int = 3) -> None:
    """Each workload's model work alone, in this process with no server running, after one
    warm-up: requests/s from the median of ``repeats`` timed calls to ``alone``, and CPU seconds
    per request (all this process's threads) to ``cpu["alone"]``."""
    for w in loads:
        if w.model_alone is None:
            continue
        w.model_alone()
        times, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            w.model_alone()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        w.alone.append(w.model_alone_requests / statistics.median(times))
        w.cpu.setdefault("alone", []).append(statistics.median(cpu) / w.model_alone_requests)
        print(
            f"alone {w.name}, c = {w.concurrency}: {w.alone[-1]:.2f} req/s, "
            f"{w.cpu['alone'][-1] * 1000:.0f} CPU ms/request",
            flush=True,
        )


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (``platform`` often says only x86_64)."""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def report(loads: list[Workload]) -> list[list[str]]:
    rows = []
    for w in loads:
        tp = {side: statistics.median(r.throughput for r in w.runs[side]) for side in ("peer", "ours")}
        cpu = {side: ms(statistics.median(w.cpu[side])) for side in ("peer", "ours")}
        lat = {side: [x for r in w.runs[side] for x in r.latencies] for side in ("peer", "ours")}
        rows.append(
            [
                f"{w.name}, c = {w.concurrency}",
                f"{tp['peer']:.2f} ({spread([r.throughput for r in w.runs['peer']])})",
                f"{tp['ours']:.2f} ({spread([r.throughput for r in w.runs['ours']])})",
                f"**{tp['ours'] / tp['peer']:.2f}x**",
                ms(p(lat["peer"], 50)),
                ms(p(lat["ours"], 50)),
                cpu["peer"],
                cpu["ours"],
            ]
        )
        if w.alone:
            rows.append(
                [
                    f"{w.name}: {w.model_alone_label}",
                    "",
                    f"{statistics.median(w.alone):.2f} ({spread(w.alone)})",
                    "",
                    "",
                    "",
                    "",
                    ms(statistics.median(w.cpu["alone"])),
                ]
            )
    return rows


def with_settings(config: dict, settings: list[str]) -> dict:
    """``config`` with each ``FAMILY.KEY=VALUE`` of ``--set`` in it."""
    for setting in settings:
        path, _, value = setting.partition("=")
        family, _, key = path.partition(".")
        config[family][key] = yaml.safe_load(value)
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True, help="a bench/peer_<name>.py module: infinity, roboflow")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per server, in turns (at least 2)")
    ap.add_argument("--venvs", type=Path, default=CACHE / "venvs", help="the peers' virtualenvs (DIR/<name>)")
    ap.add_argument("--work", type=Path, default=CACHE / "work", help="model files and logs (DIR/<name>)")
    ap.add_argument("--only", default="", help="comma-separated workload names to run (default all)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FAMILY.KEY=VALUE",
        help="a setting of ours over the peer's config (a YAML value; repeatable): sam2.prompt_threads=2",
    )
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: the sides run in turns")
    peer = load_peer(args.peer)
    venv, work = args.venvs / args.peer, args.work / args.peer
    work.mkdir(parents=True, exist_ok=True)
    peer.install(venv)
    peer.prepare(venv, work)
    loads = peer.workloads(work)
    if args.only:
        wanted = set(args.only.split(","))
        loads = [w for w in loads if w.name in wanted]
    config = work / "visionserve.yaml"
    config.write_text(yaml.safe_dump(with_settings(peer.ours_config(work), args.set)))
    loads_before = load_average()
    for i in range(args.rounds):
        for side in ("peer", "ours", "alone") if i % 2 == 0 else ("alone", "ours", "peer"):
            print(f"round {i + 1}: {side} (load average {load_average()})", flush=True)
            if side == "alone":
                model_alone_rates(loads)
            elif side == "peer":
                with serving(peer, venv, work) as url:
                    run_all(url, side, loads)
            else:
                with server(config) as url:
                    run_all(url, side, loads)
    loads_after = load_average()
    print(
        f"\n`{' '.join(['python', *sys.argv])}` on {cpu_name()} ({machine()}); {peer.NAME} vs visionserve, "
        f"one server at a time, {args.rounds} rounds in turns; requests/s is the median over rounds "
        f"(± spread), p50 over all requests; "
        f"load average (1/5/15 min) {loads_before} before, {loads_after} after.\n"
    )
    print(
        table(
            [
                "workload",
                f"{peer.NAME} req/s",
                "visionserve req/s",
                "ratio",
                "p50 ms peer",
                "p50 ms ours",
                "CPU ms/req peer",
                "CPU ms/req ours",
            ],
            report(loads),
        )
    )


if __name__ == "__main__":
    main()
