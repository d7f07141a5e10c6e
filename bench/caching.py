"""SAM 2 and SAM 3: a prompt on a cached image vs the same prompt on a new image, over HTTP.

    python bench/caching.py [--config configs/bench-full.yaml] [--rounds 3]

New and cached calls alternate; every "new" call sends an image the server has not seen.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, ran, server, spread, table, timed  # noqa: E402


def image(seed: int, h: int = 480, w: int = 640) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


CASES = {
    "sam2": (
        "prompt_mask",
        lambda img, i: {"image": img, "point_coords": [[100 + i, 200]], "point_labels": [1]},
    ),
    "sam3": ("predict", lambda img, i: {"image": img, "prompts": [f"object {i}"]}),
}


def measure(url: str, family: str, rounds: int) -> tuple[list[float], list[float]]:
    """(new-image seconds, cached-image seconds), alternating."""
    op, payload = CASES[family]

    def post(body: dict) -> None:
        requests.post(f"{url}/{family}/{op}", json=body, timeout=3600).raise_for_status()

    cached_img = image(0)
    post(payload(cached_img, 0))  # encode it once
    new_t: list[float] = []
    cached_t: list[float] = []
    for i in range(rounds):
        pair = [
            (new_t, lambda i=i: post(payload(image(1000 + i), i))),
            (cached_t, lambda i=i: post(payload(cached_img, i + 1))),
        ]
        for bucket, call in pair if i % 2 == 0 else pair[::-1]:
            bucket.append(timed(call))
        print(family, ms(new_t[-1]), ms(cached_t[-1]), flush=True)
    return new_t, cached_t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--families", default="sam2,sam3")
    args = ap.parse_args()
    rows = []
    for family in args.families.split(","):
        with server(args.config, "--models", family) as url:
            new_t, cached_t = measure(url, family, args.rounds)
        ratio = statistics.median(new_t) / statistics.median(cached_t)
        route = f"/{family}/{CASES[family][0]}"
        new, cached = statistics.median(new_t), statistics.median(cached_t)
        rows.append([route, ms(new), spread(new_t), ms(cached), spread(cached_t), f"**{ratio:.0f}x**"])
    print(ran(f"{args.rounds} alternations"))
    print(table(["route", "new image p50 ms", "spread", "cached image p50 ms", "spread", "speed-up"], rows))


if __name__ == "__main__":
    main()
