"""CPU an idle server burns: every process of ``app.py`` over a quiet interval.

    python bench/idle.py [--config configs/demo.yaml] [--seconds 10]
    python bench/idle.py --sides litserve,zmq,ours --families clip --routes extract --seconds 20

With ``--sides``, each side of the three-sided comparison (``harness.SIDES``) serves the same
families in turn; ``--routes`` keeps the LitServe sides (one worker per route) to those ops.

A model server mostly waits; on a shared machine what it spends waiting is taken from
everything else. LitServe's own batched loop polls its queue every millisecond; ours blocks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, SIDES, ran, side_server, table  # noqa: E402


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    return {p.pid: p.cpu_times().user + p.cpu_times().system for p in procs}


def kind(proc: psutil.Process, root: psutil.Process) -> str:
    if proc.pid == root.pid:
        return "main (HTTP)"
    return "model worker" if "spawn_main" in " ".join(proc.cmdline()) else "helper (queue manager, ...)"


def measure(url: str, seconds: float) -> tuple[dict[int, str], dict[int, float]]:
    """Each process of the server at ``url``: its kind and its CPU seconds over ``seconds``."""
    port = url.rsplit(":", 1)[1]
    root = next(p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))
    procs = [root, *root.children(recursive=True)]
    kinds = {p.pid: kind(p, root) for p in procs}
    time.sleep(3)  # let start-up work finish
    before = cpu_seconds(procs)
    time.sleep(seconds)
    after = cpu_seconds(procs)
    return kinds, {pid: after[pid] - before[pid] for pid in after}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--sides", default="ours", help="comma-separated: " + ", ".join(SIDES))
    ap.add_argument("--families", default=None, help="comma-separated (default: all in the config)")
    ap.add_argument("--routes", default=None, help="ops the LitServe sides serve (default: all)")
    args = ap.parse_args()
    rows = []
    for side in args.sides.split(","):
        if args.families is None and side == "ours":
            families: list[str] = []  # app.py's default: every enabled family
        elif args.families is None:
            from apis.config import load_config

            families = list(load_config(args.config).families())
        else:
            families = args.families.split(",")
        routes = args.routes.split(",") if args.routes else None
        with side_server(side, args.config, families, routes) as url:
            kinds, used = measure(url, args.seconds)
        for pid, cpu in used.items():
            rows.append([SIDES[side], pid, kinds[pid], f"{100 * cpu / args.seconds:.1f}"])
        rows.append([SIDES[side], "", "**all**", f"**{100 * sum(used.values()) / args.seconds:.1f}**"])
    print(ran(f"idle for {args.seconds:.0f} s"))
    print(table(["side", "pid", "process", "% of one core"], rows))


if __name__ == "__main__":
    main()
