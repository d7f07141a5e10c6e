"""SAM 3 prompts on a cached image: all of a request's prompts, and concurrent requests' prompts,
in one detector forward vs one forward per prompt.

    python bench/sam3_prompts.py [--config configs/bench-full.yaml] [--counts 1,4,8,16]

1. In-process, the model's own ceiling: the pure detector forward (texts already encoded, image
   cached) of ``--batch`` queries at once against ``--batch`` forwards of one query.
2. Over HTTP, one server (``prompt_chunk`` = the largest count): ``--concurrent`` single-prompt
   requests one after another (one forward per prompt, what any unbatched server does), then one
   request with n prompts for each n of ``--counts``, then ``--concurrent`` single-prompt
   requests at once, all on one cached image. ``/info``'s detector batch sizes show what ran
   together. "One at a time" for n prompts is the time of the first n sequential requests (for
   n above ``--concurrent``, n / ``--concurrent`` times all of them, marked *).

Each number is one run (full-size SAM 3 takes seconds per prompt on a CPU): compare the HTTP
speed-ups with the in-process ceiling measured in the same run rather than with other runs.
"""

from __future__ import annotations

import argparse
import base64
import io
import resource
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
from apis.core.process import reuse_freed_memory  # noqa: E402
from apis.sam3.model import Query, load_sam3  # noqa: E402


def prompts(n: int, start: int = 0) -> list[str]:
    return [f"object number {i}" for i in range(start, start + n)]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ceiling(cfg, batch: int) -> list[list[object]]:
    """Rows of the in-process table: ``batch`` forwards of one query vs one forward of ``batch``."""
    reuse_freed_memory()  # as in a worker
    runner = load_sam3(cfg.sam3.models[0], "cpu")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image(0)))).convert("RGB"))
    enc = runner.encode(["bench"], [pixels])[0]
    runner.texts(prompts(batch))  # encoded once: only the detector is timed
    queries = [Query(enc, p) for p in prompts(batch)]
    runner.detect(queries[:1], 1)  # warm-up
    t1 = timed(lambda: runner.detect(queries[:1], 1))
    print("in-process batch 1", ms(t1), flush=True)
    tb = timed(lambda: runner.detect(queries, batch))
    print("in-process batch", batch, ms(tb), flush=True)
    return [[batch, ms(t1), ms(batch * t1), ms(tb), f"**{batch * t1 / tb:.2f}x**", f"{peak_gb():.1f}"]]


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


def over_http(url: str, counts: list[int], concurrent: int) -> dict:
    img = image(0)

    def post(body: dict) -> None:
        requests.post(f"{url}/sam3/predict", json={"image": img, **body}, timeout=3600).raise_for_status()

    post({"prompts": ["warm-up"]})  # the image is cached from now on
    singles = [timed(lambda p=p: post({"prompts": [p]})) for p in prompts(concurrent, 1000)]
    print(url, "singles", [ms(t) for t in singles], flush=True)
    batched, batches = {}, {}
    for n in counts:
        before = detector_batches(url)
        batched[n] = timed(lambda n=n: post({"prompts": prompts(n, 2000)}))
        batches[n] = new_batches(before, detector_batches(url))
        print(url, n, ms(batched[n]), batches[n], flush=True)
    before = detector_batches(url)
    with ThreadPoolExecutor(concurrent) as pool:
        burst = timed(lambda: list(pool.map(lambda p: post({"prompts": [p]}), prompts(concurrent, 3000))))
    burst_batches = new_batches(before, detector_batches(url))
    print(url, "burst", ms(burst), burst_batches, flush=True)
    return {
        "singles": singles,
        "batched": batched,
        "batches": batches,
        "burst": burst,
        "burst_batches": burst_batches,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--counts", default="1,4,8,16", help="prompts per request")
    ap.add_argument("--batch", type=int, default=8, help="in-process ceiling: queries in one forward")
    ap.add_argument("--concurrent", type=int, default=8, help="single-prompt requests sent at once")
    ap.add_argument(
        "--http", action=argparse.BooleanOptionalAction, default=True, help="--no-http: part 1 only"
    )
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    cfg = load_config(args.config)
    model = cfg.sam3.models[0]
    ceiling_rows = ceiling(cfg, args.batch)  # its model is freed on return, before the server starts
    print(ran(f"one run; model {model.name} (weights: {model.weights}), float32; one cached 640x480 image"))
    print("In-process ceiling: the detector forward alone, b queries on one cached image\n")
    print(table(["b", "batch 1 ms", "b x batch 1 ms", "batch b ms", "speed-up", "peak RSS GB"], ceiling_rows))
    if not args.http:
        return

    with tempfile.TemporaryDirectory() as tmp:
        raw = cfg.model_dump(mode="json", exclude_unset=True)  # paths made absolute
        raw["sam3"]["prompt_chunk"] = max(counts)
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(raw))
        with server(path, "--models", "sam3") as url:
            r = over_http(url, counts, args.concurrent)

    singles = r["singles"]
    rows = []
    for n in counts:
        one = sum(singles[:n]) if n <= len(singles) else n / len(singles) * sum(singles)
        mark = "" if n <= len(singles) else "*"
        rows.append(
            [n, ms(one) + mark, ms(r["batched"][n]), r["batches"][n], f"**{one / r['batched'][n]:.2f}x**"]
        )
    print(f"\nOne request with n prompts (prompt_chunk {max(counts)}) vs n single-prompt requests in a row\n")
    print(table(["n", "one at a time ms", "one request ms", "detector forwards", "speed-up"], rows))
    print(f"\n{args.concurrent} single-prompt requests on one cached image\n")
    alone = sum(singles)
    print(
        table(
            ["sent", "all answered ms", "detector forwards", "speed-up"],
            [
                ["one after another", ms(alone), f"{len(singles)}x1", "1.00x"],
                ["all at once", ms(r["burst"]), r["burst_batches"], f"**{alone / r['burst']:.2f}x**"],
            ],
        )
    )


if __name__ == "__main__":
    main()
