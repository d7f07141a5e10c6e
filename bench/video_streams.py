"""Video session streams over HTTP: first frame, frames/s, a client that leaves, and a short
request during a long propagation on the same worker.

    python bench/video_streams.py [--frames 30] [--trials 5] [--config configs/demo.yaml]

One server with one SAM 2 worker (the config's sam2 section only). Measured:

* propagation: time to the first NDJSON line and frames/s of a ``--frames`` clip;
* disconnect: the client reads 2 lines and closes the connection; the worker's count of frames
  computed for that propagation (GET .../{id} ``last_propagation``) minus the lines read is
  what was computed for nobody;
* interleaving: a prompt on another session of the same worker, idle vs while a long
  propagation streams (its latency is about one frame of the stream plus its own time).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pybase64
import requests
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, ran, server, table  # noqa: E402

POINT = {"frame_index": 0, "obj_id": 1, "points": [[40, 30]], "labels": [1]}


def clip(n: int, h: int = 120, w: int = 160) -> list[str]:
    """Base64 JPEG frames of a disc moving over noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    out = []
    for t in range(n):
        img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        img[(yy - h // 2) ** 2 + (xx - 30 - 2 * t) ** 2 < 300] = (230, 200, 40)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(pybase64.b64encode_as_string(buf.getvalue()))
    return out


def sam2_only(config: Path) -> Path:
    cfg = yaml.safe_load(config.read_text())
    sam2 = cfg["sam2"]
    sam2["workers_per_device"] = 1
    for m in sam2["models"]:
        if m.get("arch_config"):
            m["arch_config"] = str((config.parent / m["arch_config"]).resolve())
    path = Path(tempfile.mkdtemp()) / "video-bench.yaml"
    path.write_text(yaml.safe_dump({"sam2": sam2}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    frames = clip(args.frames)
    with server(sam2_only(args.config)) as url:
        base = f"{url}/sam2/video/sessions"

        def session() -> str:
            sid = requests.post(base, json={"frames": frames}, timeout=600).json()["session_id"]
            requests.post(f"{base}/{sid}/prompts", json=POINT, timeout=600).raise_for_status()
            return sid

        long_id, short_id = session(), session()
        first, rates, wasted, idle, busy = [], [], [], [], []
        for _ in range(args.trials):
            t0 = time.perf_counter()
            r = requests.post(f"{base}/{long_id}/propagate", json={}, stream=True, timeout=600)
            lines = r.iter_lines()
            next(lines)
            first.append(time.perf_counter() - t0)
            rates.append(json.loads([x for x in lines if x][-1])["frames_per_s"])

            r = requests.post(f"{base}/{long_id}/propagate", json={}, stream=True, timeout=600)
            lines = r.iter_lines()
            read = [next(lines) for _ in range(2)]
            r.close()
            while (last := requests.get(f"{base}/{long_id}", timeout=60).json()["last_propagation"])[
                "ended"
            ] is None:
                time.sleep(0.01)
            wasted.append(last["frames"] - len(read))

            t0 = time.perf_counter()
            requests.post(f"{base}/{short_id}/prompts", json=POINT, timeout=600).raise_for_status()
            idle.append(time.perf_counter() - t0)
            r = requests.post(f"{base}/{long_id}/propagate", json={}, stream=True, timeout=600)
            lines = r.iter_lines()
            next(lines)
            t0 = time.perf_counter()
            requests.post(f"{base}/{short_id}/prompts", json=POINT, timeout=600).raise_for_status()
            busy.append(time.perf_counter() - t0)
            list(lines)
    med = statistics.median
    print(
        ran(
            f"tiny SAM 2 (random weights), one worker, {args.frames} frames of 160x120, "
            f"{args.trials} trials, medians"
        )
    )
    print(
        table(
            [
                "first frame ms",
                "frames/s",
                "frames computed after the client left",
                "prompt ms idle",
                "prompt ms during a propagation",
            ],
            [
                [
                    ms(med(first)),
                    f"{med(rates):.1f}",
                    f"{med(wasted)} (max {max(wasted)})",
                    ms(med(idle)),
                    ms(med(busy)),
                ]
            ],
        )
    )


if __name__ == "__main__":
    main()
