"""Bytes on the wire and client decode time of a default ``/clip/extract`` answer, per format.

    python bench/transport.py [--config configs/bench-full.yaml] [--load-size 1024]

float32 JSON is what the seed sent; float16 halves the values; npy drops base64's third.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, ran, server, spread, table, timed  # noqa: E402
from bench.serving import photo  # noqa: E402
from clients.common import decode_array  # noqa: E402

FORMATS = {
    "JSON float32 (seed)": {"output_dtype": "float32"},
    "JSON float16": {"output_dtype": "float16"},
    "npy float32": {"output_dtype": "float32", "response_format": "npy"},
    "npy float16": {"output_dtype": "float16", "response_format": "npy"},
}


def decode(content: bytes, npy: bool) -> np.ndarray:
    """What a client does with the body: parse JSON + base64, or read the .npy."""
    if npy:
        return np.load(io.BytesIO(content), allow_pickle=False)
    r = json.loads(content)
    return decode_array(r["features"], r["shape"], r["dtype"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--load-size", type=int, default=1024, help="the seed's default")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    img = photo(480, 640)
    bodies = {}
    with server(args.config, "--models", "clip") as url:
        for name, extra in FORMATS.items():
            r = requests.post(
                f"{url}/clip/extract", json={"image": img, "load_size": args.load_size, **extra}
            )
            r.raise_for_status()
            bodies[name] = r.content
            print(name, len(r.content), flush=True)
    seed_bytes = len(bodies["JSON float32 (seed)"])
    reference = decode(bodies["JSON float32 (seed)"], False)
    times: dict[str, list[float]] = {name: [] for name in FORMATS}
    for i in range(args.repeats):  # formats in a rotating order
        names = list(FORMATS)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            times[name].append(timed(lambda n=name: decode(bodies[n], "npy" in n)))
    rows = []
    for name, content in bodies.items():
        arr = decode(content, "npy" in name)
        err = float(np.abs(arr.astype(np.float32) - reference).max())
        med = statistics.median(times[name])
        rows.append(
            [
                name,
                f"{len(content) / 2**20:.2f}",
                f"**{len(content) / seed_bytes:.2f}**",
                ms(med),
                spread(times[name]),
                f"{err:.1e}",
            ]
        )
    shape = "x".join(map(str, reference.shape))
    print(
        ran(
            f"a 640x480 image, default options, features {shape}; "
            f"decode = client parse to numpy, {args.repeats} repeats"
        )
    )
    print(table(["format", "MiB on the wire", "vs seed", "decode p50 ms", "spread", "max abs error"], rows))


if __name__ == "__main__":
    main()
