"""CPU an idle server burns: every process of ``app.py`` over a quiet interval.

    python bench/idle.py [--config configs/demo.yaml] [--seconds 10]

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

from bench.harness import ROOT, ran, server, table  # noqa: E402


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    return {p.pid: p.cpu_times().user + p.cpu_times().system for p in procs}


def kind(proc: psutil.Process, root: psutil.Process) -> str:
    if proc.pid == root.pid:
        return "main (HTTP)"
    return "model worker" if "spawn_main" in " ".join(proc.cmdline()) else "helper (queue manager, ...)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with server(args.config) as url:
        port = url.rsplit(":", 1)[1]
        root = next(p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))
        procs = [root, *root.children(recursive=True)]
        kinds = {p.pid: kind(p, root) for p in procs}
        time.sleep(3)  # let start-up work finish
        before = cpu_seconds(procs)
        time.sleep(args.seconds)
        after = cpu_seconds(procs)
    rows = [[pid, kinds[pid], f"{100 * (after[pid] - before[pid]) / args.seconds:.1f}"] for pid in after]
    total = 100 * sum(after[p] - before[p] for p in after) / args.seconds
    rows.append(["", "**all**", f"**{total:.1f}**"])
    print(ran(f"idle for {args.seconds:.0f} s"))
    print(table(["pid", "process", "% of one core"], rows))


if __name__ == "__main__":
    main()
