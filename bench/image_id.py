"""SAM 2 clicks on an embedded image: sending its ``image_id`` vs sending the image again each time.

    python bench/image_id.py [--config configs/bench-full.yaml] [--rounds 4]

The image is embedded once (``/sam2/embed``); then clicks alternate between the two ways (blocks
of three, the first of each block untimed: harness.alternate). Both hit the worker's cache, so
the difference is what re-sending costs: upload, base64 and PNG/JPEG decoding, hashing. "Bytes
per click" counts the request body and the answer body (three masks as packbits).
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

from bench.harness import ROOT, alternate, ms, ran, server, spread, table  # noqa: E402


def photo(fmt: str, h: int = 768, w: int = 1024) -> bytes:
    """Smooth shapes plus sensor-like noise, as a photo compresses (not random bytes)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([np.sin(xx / 90) * 60 + 120, np.cos(yy / 70) * 60 + 120, (xx + yy) / 14], -1)
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def measure(url: str, data: bytes, rounds: int) -> dict[str, tuple[list[float], int, int]]:
    """Per way: (seconds per click, request bytes, answer bytes)."""
    session = requests.Session()
    image = base64.b64encode(data).decode("ascii")
    image_id = session.post(f"{url}/sam2/embed", json={"image": image}, timeout=3600).json()["image_id"]
    sizes: dict[str, tuple[int, int]] = {}
    clicks = iter(range(10**6))

    def click(way: str, source: dict) -> None:
        k = next(clicks) % 500
        body = {**source, "point_coords": [[200 + k, 300]], "point_labels": [1], "mask_encoding": "packbits"}
        resp = session.post(
            f"{url}/sam2/prompt_mask", json=body, headers={"X-Image-Key": image_id}, timeout=600
        )
        resp.raise_for_status()
        sizes[way] = (len(resp.request.body), len(resp.content))

    by_id, resent = alternate(
        lambda: click("id", {"image_id": image_id}), lambda: click("image", {"image": image}), rounds
    )
    return {"id": (by_id, *sizes["id"]), "image": (resent, *sizes["image"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    rows = []
    with server(args.config, "--models", "sam2") as url:
        for fmt in ("JPEG", "PNG"):
            data = photo(fmt)
            got = measure(url, data, args.rounds)
            name = f"1024x768 {fmt} ({len(data) / 1e6:.2f} MB)"
            for way, label in (("image", "image re-sent"), ("id", "`image_id`")):
                times, up, down = got[way]
                rows.append(
                    [name, label, f"{up:,}", f"{down:,}", ms(statistics.median(times)), spread(times)]
                )
            ratio = statistics.median(got["image"][0]) / statistics.median(got["id"][0])
            rows.append(
                [
                    name,
                    "**re-sent / id**",
                    f"**{got['image'][1] / got['id'][1]:.0f}x**",
                    "",
                    f"**{ratio:.2f}x**",
                    "",
                ]
            )
            print(rows[-3], rows[-2], rows[-1], sep="\n", flush=True)
    print(ran(f"{args.rounds} rounds of 3 timed clicks per way, alternating"))
    print(
        table(["image", "click sends", "request bytes", "answer bytes", "p50 ms per click", "spread"], rows)
    )


if __name__ == "__main__":
    main()
