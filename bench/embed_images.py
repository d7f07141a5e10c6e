"""Several images in one embeddings request: decoded and preprocessed one after another (before)
or on the worker's decoding threads (after), through ``/v1/embeddings`` and ``/clip/embed``.

    python bench/embed_images.py [--model ViT-B-16] [--images 8] [--requests 4] [--rounds 2]

Two servers with the same random-weight CLIP, one started with ``VISIONSERVE_DECODE_THREADS=1``
(apis/vectors.py), are driven in turns (A, B, B, A) at concurrency 1 with 640x480 JPEGs. Then the
part that changed, alone in this process: decoding + open_clip's eval transform of the request's
images, one after another vs on the pool, next to the model's forward on them.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import drive, env, ms, p, ran, server, spread, table, timed  # noqa: E402

DECODE_THREADS_ENV = "VISIONSERVE_DECODE_THREADS"  # read by apis/vectors.py in the workers
SIDES = {"one after another (before)": "1", "decoding threads (after)": None}


def jpeg(seed: int, h: int = 480, w: int = 640) -> bytes:
    yy, xx = np.mgrid[:h, :w]
    base = (np.sin(xx / 23.0 + seed) + np.cos(yy / 17.0)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=90
    )
    return buf.getvalue()


def payloads(model_id: str, images: list[str]) -> dict[str, dict]:
    return {
        "/v1/embeddings": {"model": model_id, "input": [f"data:image/jpeg;base64,{b}" for b in images]},
        "/clip/embed": {"images": images},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture, random weights")
    ap.add_argument("--images", type=int, default=8, help="images per request")
    ap.add_argument("--requests", type=int, default=4, help="requests per run (concurrency 1)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    files = [jpeg(i) for i in range(args.images)]
    images = [base64.b64encode(f).decode("ascii") for f in files]
    config = {
        "limits": {"max_body_bytes": 64 * 1024 * 1024},
        "clip": {
            "max_batch_size": 8,
            "batch_timeout": 0,
            "models": [{"name": args.model, "pretrained": "random", "weights": "random"}],
        },
    }
    bodies = payloads(f"{args.model}/random", images)
    runs: dict[tuple[str, str], list] = {(side, route): [] for side in SIDES for route in bodies}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        path = Path(tmp) / "clip.yaml"
        path.write_text(yaml.safe_dump(config))
        urls = {}
        for side, value in SIDES.items():
            with env(DECODE_THREADS_ENV, value):
                urls[side] = stack.enter_context(server(path))
        for url in urls.values():
            for route, body in bodies.items():
                drive(url + route, [body], 1)  # warm-up
        for i in range(args.rounds):
            for side in list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]:
                for route, body in bodies.items():
                    runs[side, route].append(drive(urls[side] + route, [body] * args.requests, 1))
                    print(side, route, f"{runs[side, route][-1].throughput:.3f} req/s", flush=True)
    rows = []
    for route in bodies:
        tps = {}
        for side in SIDES:
            rs = runs[side, route]
            lat = [x for r in rs for x in r.latencies]
            tps[side] = statistics.median(r.throughput for r in rs)
            tp = [r.throughput for r in rs]
            rows.append([route, side, f"{tps[side]:.3f}", spread(tp), ms(p(lat, 50)), ms(p(lat, 95))])
        before, after = tps.values()
        rows.append([route, "**after / before**", f"**{after / before:.2f}x**", "", "", ""])
    print(
        ran(
            f"{args.model} random weights, float32; {args.images} 640x480 JPEGs per request, "
            f"concurrency 1, {args.requests} requests per run, {args.rounds} rounds per side in turns"
        )
    )
    print(table(["route", "decoding", "requests/s (median)", "spread", "p50 ms", "p95 ms"], rows))
    print(in_process(args.model, files))


def in_process(model_name: str, files: list[bytes]) -> str:
    """Median ms of decoding + preprocessing the request's images each way, and of the model."""
    import torch

    from apis.clip.model import encode_images, load_clip
    from apis.core.images import decode_image
    from apis.core.settings import Limits, ModelEntry

    cm = load_clip(ModelEntry(name=model_name, pretrained="random", weights="random"), "cpu")
    limits = Limits()

    def one(data: bytes) -> torch.Tensor:
        return cm.preprocess(decode_image(data, limits))

    pool = ThreadPoolExecutor(torch.get_num_threads())
    pixels = torch.stack([one(f) for f in files])

    def median_ms(fn, n: int) -> str:
        return ms(statistics.median(timed(fn) for _ in range(n)))

    rows = [
        ["decode + preprocess, one after another", median_ms(lambda: [one(f) for f in files], 5)],
        ["decode + preprocess, on the pool", median_ms(lambda: list(pool.map(one, files)), 5)],
        ["the model's forward (encode_image)", median_ms(lambda: encode_images(cm, pixels), 2)],
    ]
    pool.shutdown()
    return f"\nIn this process, {len(files)} images, {torch.get_num_threads()} threads:\n\n" + table(
        ["step", "ms (median)"], rows
    )


if __name__ == "__main__":
    main()
