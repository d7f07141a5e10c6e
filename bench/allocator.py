"""Request time and memory with glibc's default allocator vs reusing freed memory (what the
workers of some families do: ``FamilyWorker.reuses_freed_memory``, see
``apis.core.process.reuse_freed_memory``), in-process, full-size models.

    python bench/allocator.py [--families sam3,sam2,dino,clip] [--rounds 4]

The setting belongs to a whole process, so each side is its own process with the same route
set up; the parent has them run one call each in turns (A, B, B, A, ...), with a pause before
each call as between a user's requests. Each side's RSS is read after its last call (idle, what
the process keeps) with its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, ran, spread, table  # noqa: E402

CASES = {
    "sam3": ("predict", {"prompts": ["mug", "robot"]}),
    "sam2": ("prompt_mask", {"point_coords": [[320, 240]], "point_labels": [1]}),
    "dino": ("extract", {"load_size": 448}),
    "clip": ("extract", {"load_size": 336}),
}
PAUSE_S = 1.0


def side(family: str, reuse: bool) -> None:
    """Child: set the route up, then time one call per line read from stdin."""
    from apis.config import load_config
    from apis.families import FAMILIES
    from bench.serving import in_process, photo

    api = FAMILIES[family].api_class()(load_config(ROOT / "configs" / "bench-full.yaml"))
    api.reuses_freed_memory = reuse  # False: glibc's defaults
    api.setup("cpu")
    op, extra = CASES[family]
    payload = {"image": photo(), **extra}
    in_process(api, op, payload)  # warm-up (SAM: encodes the image once)
    print("ready", flush=True)
    for _ in sys.stdin:
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        in_process(api, op, payload)
        print(json.dumps(time.perf_counter() - t0), flush=True)
    print(json.dumps([_status_mb("VmRSS"), _status_mb("VmHWM")]), flush=True)


def _status_mb(field: str) -> float:
    """A size from /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="sam3,sam2,dino,clip")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--side", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side(args.side[0], args.side[1] == "reuse")
        return
    rows = []
    for family in args.families.split(","):
        procs = {
            name: subprocess.Popen(
                [sys.executable, __file__, "--side", family, name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for name in ("default", "reuse")
        }
        for proc in procs.values():
            while proc.stdout.readline().strip() != "ready":
                if proc.poll() is not None:
                    raise RuntimeError(f"{family}: a side failed to start")
        times: dict[str, list[float]] = {name: [] for name in procs}
        for i in range(args.rounds):
            for name in list(procs) if i % 2 == 0 else list(procs)[::-1]:
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                times[name].append(json.loads(procs[name].stdout.readline()))
        memory = {}
        for name, proc in procs.items():
            proc.stdin.close()
            memory[name] = json.loads(proc.stdout.readline())
            proc.wait()
        d, r = statistics.median(times["default"]), statistics.median(times["reuse"])
        route = f"/{family}/{CASES[family][0]}"
        speedup = f"**{d / r:.2f}x**"
        rss = [f"{memory[name][0]:.0f} ({memory[name][1]:.0f})" for name in ("default", "reuse")]
        rows.append([route, ms(d), spread(times["default"]), ms(r), spread(times["reuse"]), speedup, *rss])
        print(rows[-1], flush=True)
    print(ran(f"{args.rounds} calls a side in turns, {PAUSE_S:.0f} s apart"))
    header = ["route (in-process)", "glibc default ms", "spread", "reuse freed ms", "spread", "speed-up"]
    header += ["default RSS MB idle (peak)", "reuse RSS MB idle (peak)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
