"""What a client sees when the worker running its request dies, and how soon the route serves again.

    python bench/worker_kill.py [--sides litserve,zmq,ours] [--points 20]

Each side (``harness.SIDES``) serves tiny SAM 2 (configs/demo.yaml; the LitServe sides only its
``auto_mask`` route, so one worker each). A slow ``/sam2/auto_mask`` (``--points`` per side) is
timed once whole, then sent again and its worker, the server's child that spends CPU on it, is
SIGKILLed one second in. The table gives the time from the kill to the client's answer (status
and body), then to the first success of small requests sent one after another.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, SIDES, encode, ran, side_server, table  # noqa: E402
from bench.serving import photo  # noqa: E402

WAIT_S = 120.0  # how long the client waits for an answer, here and for each recovery request


def post(url: str, body: bytes, timeout: float = WAIT_S) -> tuple[int | None, bytes]:
    """(status, body) of one POST on a new connection; (None, reason) when none came in time."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}".encode()
    finally:
        conn.close()


def busiest_worker(url: str) -> psutil.Process:
    """The server's model-worker process that spends the most CPU over the next half second."""
    port = url.rsplit(":", 1)[1]
    root = next(p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))
    workers = [p for p in root.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in workers}
    time.sleep(0.5)
    return max(workers, key=lambda p: sum(p.cpu_times()[:2]) - before[p.pid])


def kill_mid_request(url: str, slow: bytes, small: bytes) -> list[str]:
    route = f"{url}/sam2/auto_mask"
    t0 = time.perf_counter()
    status, body = post(route, slow)
    whole = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"the slow request failed before any kill: {status} {body[:300]!r}")
    answer: list = []
    client = threading.Thread(target=lambda: answer.append((post(route, slow), time.perf_counter())))
    client.start()
    time.sleep(0.5)
    worker = busiest_worker(url)
    os.kill(worker.pid, signal.SIGKILL)
    killed = time.perf_counter()
    client.join()
    (status, body), answered = answer[0]
    seen: Counter[str] = Counter()  # statuses of the recovery requests before the first success
    while time.perf_counter() - killed < 300:
        code, _ = post(route, small)
        if code == 200:
            break
        seen[str(code)] += 1
        time.sleep(0.1)
    recovered = time.perf_counter() - killed
    text = body[:110].decode(errors="replace").replace("|", "/")
    return [
        f"{whole:.1f}",
        f"**{answered - killed:.2f}**",
        str(status),
        f"`{text}`",
        f"**{recovered:.1f}**",
        ", ".join(f"{n} x {code}" for code, n in seen.items()) or "none",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", default="litserve,zmq,ours", help="comma-separated: " + ", ".join(SIDES))
    ap.add_argument("--points", type=int, default=20, help="points_per_side of the slow request")
    args = ap.parse_args()
    img = photo()
    slow = encode({"image": img, "points_per_side": args.points})
    small = encode({"image": img, "points_per_side": 2})
    rows = []
    for side in args.sides.split(","):
        with side_server(side, ROOT / "configs" / "demo.yaml", ["sam2"], ["auto_mask"]) as url:
            rows.append([SIDES[side], *kill_mid_request(url, slow, small)])
            print(rows[-1], flush=True)
    print(ran(f"SIGKILL 1 s into a slow /sam2/auto_mask (points_per_side {args.points}), tiny SAM 2"))
    print(
        table(
            [
                "side",
                "slow request, whole s",
                "kill to answer s",
                "status",
                "body",
                "kill to next success s",
                "statuses before it",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
