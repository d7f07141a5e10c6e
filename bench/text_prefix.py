"""CLIP ``/clip/encode_text`` requests/s with the text tower run over the deciding prefix (the
batch's longest prompt, as the server does) and over all 77 context positions (before).

    python bench/text_prefix.py [--model ViT-B-16] [--rounds 2] [--requests 32,128]

Two servers with the same random-weight CLIP, one started with
``VISIONSERVE_CLIP_TEXT_FULL_CONTEXT=1`` (apis/clip/model.py), are driven in turns (A, B, B, A)
at concurrency 1 and 32 with prompts of 9-11 tokens, so both see the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import drive, env, ms, p, ran, server, spread, table  # noqa: E402

FULL_CONTEXT_ENV = "VISIONSERVE_CLIP_TEXT_FULL_CONTEXT"  # read by apis/clip/model.py in the workers
SIDES = {"all 77 positions (before)": "1", "deciding prefix (after)": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16", help="open_clip architecture, random weights")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", default="32,128", help="requests per run at c = 1 and c = 32")
    args = ap.parse_args()
    counts = dict(zip((1, 32), (int(n) for n in args.requests.split(",")), strict=True))
    texts = [{"text": f"a photo of object number {i} on a table"} for i in range(max(counts.values()))]
    config = {
        "clip": {
            "max_batch_size": 32,
            "batch_timeout": 0,
            "models": [{"name": args.model, "pretrained": "random", "weights": "random"}],
        }
    }
    runs: dict[tuple[str, int], list] = {(side, c): [] for side in SIDES for c in counts}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        path = Path(tmp) / "clip.yaml"
        path.write_text(yaml.safe_dump(config))
        urls = {}
        for side, value in SIDES.items():
            with env(FULL_CONTEXT_ENV, value):
                urls[side] = stack.enter_context(server(path)) + "/clip/encode_text"
        for url in urls.values():
            drive(url, texts[:32], 32)  # warm-up
        for i in range(args.rounds):
            for side in list(SIDES) if i % 2 == 0 else list(SIDES)[::-1]:
                for c, n in counts.items():
                    runs[side, c].append(drive(urls[side], texts[:n], c))
                    print(side, f"c={c}", f"{runs[side, c][-1].throughput:.1f} req/s", flush=True)
    rows = []
    for c in counts:
        tps = {}
        for side in SIDES:
            rs = runs[side, c]
            lat = [x for r in rs for x in r.latencies]
            tps[side] = statistics.median(r.throughput for r in rs)
            rows.append(
                [
                    c,
                    side,
                    f"{tps[side]:.1f}",
                    spread([r.throughput for r in rs]),
                    ms(p(lat, 50)),
                    ms(p(lat, 95)),
                ]
            )
        before, after = tps.values()
        rows.append([c, "**after / before**", f"**{after / before:.2f}x**", "", "", ""])
    print(
        ran(
            f"{args.model} random weights, float32; {args.rounds} rounds per side in turns; "
            f"requests per run by concurrency: {counts}"
        )
    )
    print(
        table(["concurrency", "/clip/encode_text", "requests/s (median)", "spread", "p50 ms", "p95 ms"], rows)
    )


if __name__ == "__main__":
    main()
