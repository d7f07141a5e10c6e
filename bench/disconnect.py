"""What a worker does after the client of a long request leaves: it stops at the next chunk.

    python bench/disconnect.py [--points 32] [--prompts 32]

Tiny SAM 2 and SAM 3 (configs/demo.yaml, random weights; SAM 3 with ``prompt_chunk: 1``) on
CPU. Each long request (SAM 2 ``auto_mask`` with ``--points`` per side in batches of 8 points;
SAM 3 ``predict`` with ``--prompts`` prompts, one per detector forward) is timed once whole, then
sent again by a client that leaves after a quarter of that time. The table gives the workers'
CPU from 0.5 to 2.5 s after the client left, and how soon a small request sent then is
answered: without apis/core/withdrawal.py the worker computed the rest of the abandoned
request for nobody, and the small one queued behind it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import psutil
import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ran, server, table  # noqa: E402
from bench.serving import photo  # noqa: E402


def worker_cpu(url: str, seconds: float) -> float:
    """CPU percent (100 = one core) of the server's model workers together over ``seconds``."""
    port = url.rsplit(":", 1)[1]
    root = next(p for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))
    workers = [p for p in root.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    before = sum(sum(p.cpu_times()[:2]) for p in workers)
    time.sleep(seconds)
    return 100 * (sum(sum(p.cpu_times()[:2]) for p in workers) - before) / seconds


def leave_early(url: str, route: str, body: dict, small: dict) -> list[object]:
    t = time.monotonic()
    whole = requests.post(url + route, json=body, timeout=900)
    full = time.monotonic() - t
    assert whole.status_code == 200, whole.text
    leave = full / 4
    with suppress(requests.exceptions.ReadTimeout):
        requests.post(url + route, json=body, timeout=leave)
    time.sleep(0.5)
    cpu = worker_cpu(url, 2.0)
    t = time.monotonic()
    answered = requests.post(url + route, json=small, timeout=900)
    next_answer = time.monotonic() - t
    assert answered.status_code == 200, answered.text
    return [route, f"{full:.1f}", f"{leave:.1f}", f"{cpu:.0f} %", f"{next_answer:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=32, help="SAM 2 auto_mask points per side")
    ap.add_argument("--prompts", type=int, default=32, help="SAM 3 prompts (at most 32)")
    args = ap.parse_args()
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg = {"limits": cfg["limits"], "sam2": cfg["sam2"], "sam3": {**cfg["sam3"], "prompt_chunk": 1}}
    for fam in ("sam2", "sam3"):
        for m in cfg[fam]["models"]:
            m["arch_config"] = str(ROOT / "configs" / m["arch_config"])
    img = photo()
    sam2 = {"image": img, "points_per_side": args.points, "points_per_batch": 8, "crop_n_layers": 0}
    sam3 = {"image": img, "prompts": [f"thing {i}" for i in range(args.prompts)], "return_masks": False}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(cfg, f)
        f.flush()
        with server(f.name) as url:
            requests.post(url + "/sam3/predict", json={**sam3, "prompts": ["warm-up"]}, timeout=300)
            rows = [
                leave_early(url, "/sam2/auto_mask", sam2, {**sam2, "points_per_side": 2}),
                leave_early(url, "/sam3/predict", sam3, {**sam3, "prompts": ["one"]}),
            ]
    print(ran("tiny models with random weights on CPU; the client leaves after a quarter of the full time"))
    print(
        table(
            [
                "route",
                "full request (s)",
                "client left at (s)",
                "workers' CPU 0.5-2.5 s after",
                "next small request (s)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
