"""SAM 3 prompts on a cached image: all of a request's prompts, and concurrent requests' prompts,
in one detector forward (``prompt_chunk``) vs one forward per prompt.

    python bench/sam3_prompts.py [--config configs/bench-full.yaml] [--counts 1,4,8,16]

1. In-process, the model's own ceiling: the pure detector forward (texts already encoded, image
   cached) at batch b against b forwards of batch 1, with the process's peak memory.
2. Over HTTP, one server at a time, ``prompt_chunk`` 1 (one forward per prompt) then
   ``--chunk``: one request with n prompts for each n of ``--counts``, then ``--concurrent``
   single-prompt requests at once, all on one cached image. ``/info``'s detector batch sizes
   show what ran together.

Each number is one run (full-size SAM 3 takes seconds per prompt on a CPU): compare the HTTP
speed-ups with the in-process ceiling measured in the same run rather than with other runs.
"""

from __future__ import annotations

import argparse
import base64
import io
import resource
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.caching import image  # noqa: E402
from bench.harness import ROOT, ms, ran, server, table, timed  # noqa: E402

# isort: split
from apis.config import load_config  # noqa: E402
from apis.sam3_model import Query, load_sam3  # noqa: E402


def prompts(n: int, start: int = 0) -> list[str]:
    return [f"object number {i}" for i in range(start, start + n)]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ceiling(cfg, counts: list[int]) -> list[list[object]]:
    """Rows of the in-process table: b forwards of batch 1 vs one forward of batch b."""
    runner = load_sam3(cfg.sam3.models[0], "cpu")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image(0)))).convert("RGB"))
    enc = runner.encode([pixels])[0]
    most = max(counts)
    runner.texts(prompts(most))  # encoded once: only the detector is timed
    queries = [Query(enc, p) for p in prompts(most)]
    runner.detect(queries[:1], 1)  # warm-up
    one = [timed(lambda: runner.detect(queries[:1], 1)) for _ in range(3)]
    t1 = statistics.median(one)
    print("in-process batch 1", ms(t1), flush=True)
    rows = [[1, ms(t1), ms(t1), "1.00x", f"{peak_gb():.1f}"]]
    for b in sorted(c for c in counts if c > 1):
        tb = timed(lambda b=b: runner.detect(queries[:b], b))
        rows.append([b, ms(b * t1), ms(tb), f"**{b * t1 / tb:.2f}x**", f"{peak_gb():.1f}"])
        print("in-process batch", b, ms(tb), flush=True)
    return rows


def detector_batches(url: str) -> dict[str, int]:
    workers = requests.get(f"{url}/info", timeout=60).json()["families"]["sam3"]["workers"]
    out: dict[str, int] = {}
    for w in workers:
        for hist in w["detector_batch_sizes"].values():
            for k, v in hist.items():
                out[k] = out.get(k, 0) + v
    return out


def new_batches(before: dict[str, int], after: dict[str, int]) -> str:
    diff = {int(k): v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return " ".join(f"{v}x{k}" for k, v in sorted(diff.items()))


def over_http(url: str, counts: list[int], concurrent: int) -> tuple[dict[int, float], float, str, list[str]]:
    """(seconds per n-prompt request, seconds for the concurrent burst, its detector batches,
    the detector batches of each n-prompt request)."""
    img = image(0)

    def post(body: dict) -> None:
        requests.post(f"{url}/sam3/predict", json={"image": img, **body}, timeout=3600).raise_for_status()

    post({"prompts": prompts(max(max(counts), concurrent), 1000)})  # image cached, texts encoded
    per_request, batches = {}, []
    for n in counts:
        before = detector_batches(url)
        per_request[n] = timed(lambda n=n: post({"prompts": prompts(n, 1000)}))
        batches.append(new_batches(before, detector_batches(url)))
        print(url, n, ms(per_request[n]), batches[-1], flush=True)
    before = detector_batches(url)
    with ThreadPoolExecutor(concurrent) as pool:
        burst = timed(lambda: list(pool.map(lambda p: post({"prompts": [p]}), prompts(concurrent, 1000))))
    burst_batches = new_batches(before, detector_batches(url))
    print(url, "burst", ms(burst), burst_batches, flush=True)
    return per_request, burst, burst_batches, batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--counts", default="1,4,8,16", help="prompts per request")
    ap.add_argument("--chunk", type=int, default=16, help="prompt_chunk of the batched server")
    ap.add_argument("--concurrent", type=int, default=8, help="single-prompt requests sent at once")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    cfg = load_config(args.config)
    ceiling_rows = ceiling(cfg, counts)  # its model is freed on return, before any server starts

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in (1, args.chunk):
            raw = cfg.model_dump(mode="json", exclude_unset=True)  # paths made absolute
            raw["sam3"]["prompt_chunk"] = chunk
            path = Path(tmp) / f"chunk-{chunk}.yaml"
            path.write_text(yaml.safe_dump(raw))
            with server(path, "--models", "sam3") as url:
                results[chunk] = over_http(url, counts, args.concurrent)

    (single, single_burst, single_bb, _), (batched, batched_burst, batched_bb, batched_b) = (
        results[1],
        results[args.chunk],
    )
    rows = [
        [n, ms(single[n]), ms(batched[n]), batches, f"**{single[n] / batched[n]:.2f}x**"]
        for n, batches in zip(counts, batched_b, strict=True)
    ]
    model = cfg.sam3.models[0]
    print(ran(f"one run; model {model.name} (weights: {model.weights}), float32; one cached 640x480 image"))
    print("In-process ceiling: the detector forward alone, b queries on one cached image\n")
    print(table(["b", "b x batch 1 ms", "batch b ms", "speed-up", "peak RSS GB"], ceiling_rows))
    print(f"\nOne request with n prompts, prompt_chunk 1 vs {args.chunk}\n")
    print(table(["n", "one at a time ms", "batched ms", "detector forwards", "speed-up"], rows))
    print(f"\n{args.concurrent} concurrent single-prompt requests, one cached image\n")
    print(
        table(
            ["prompt_chunk", "all answered ms", "detector forwards"],
            [
                [1, ms(single_burst), single_bb],
                [args.chunk, ms(batched_burst), f"{batched_bb} (**{single_burst / batched_burst:.2f}x**)"],
            ],
        )
    )


if __name__ == "__main__":
    main()
