"""Two workers, image caches and routing: requests on one image sent to the worker that has it
cached (``route_by_image: true``, the default) vs to the least busy worker (``false``).

    python bench/affinity.py [--config configs/bench-full.yaml] [--families sam2] [--rounds 3]

Two servers run side by side, each with two workers per family, one with each setting. In every
round, ``--pipelines`` clients each take ``--images`` new images one after another and send
``--prompts`` prompts on each image at once (a labelling pipeline asking for one mask per box);
the rounds alternate between the two servers. "Per image" is the time until all of an image's
answers are back; "encoder runs" counts the image encodings the workers did (``/info``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.caching import CASES, image  # noqa: E402
from bench.harness import ROOT, ms, ran, server, spread, table, timed  # noqa: E402

# isort: split
from apis.config import load_config  # noqa: E402


def encoder_runs(url: str, family: str) -> int:
    workers = requests.get(f"{url}/info", timeout=60).json()["families"][family]["workers"]
    return sum(sum(w["encoded_images"].values()) for w in workers)


def round_trip(url: str, family: str, seed: int, args: argparse.Namespace) -> tuple[list[float], int]:
    """One round on one server: (seconds per image, encoder runs)."""
    op, payload = CASES[family]
    before = encoder_runs(url, family)

    def post(body: dict) -> None:
        requests.post(f"{url}/{family}/{op}", json=body, timeout=3600).raise_for_status()

    def pipeline(p: int) -> list[float]:
        times = []
        with ThreadPoolExecutor(args.prompts) as pool:
            for j in range(args.images):
                img = image(seed + 100 * p + j)
                bodies = [payload(img, i) for i in range(args.prompts)]
                times.append(timed(lambda bodies=bodies: list(pool.map(post, bodies))))
        return times

    with ThreadPoolExecutor(args.pipelines) as pool:
        per_image = [t for times in pool.map(pipeline, range(args.pipelines)) for t in times]
    return per_image, encoder_runs(url, family) - before


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--families", default="sam2")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per setting, alternating")
    ap.add_argument("--pipelines", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="new images per pipeline and round")
    ap.add_argument("--prompts", type=int, default=4, help="prompts sent at once on each image")
    args = ap.parse_args()
    rows = []
    for family in args.families.split(","):
        cfg = load_config(args.config).model_dump(mode="json", exclude_unset=True)  # paths made absolute
        times: dict[bool, list[float]] = {True: [], False: []}
        runs = dict.fromkeys(times, 0)
        with tempfile.TemporaryDirectory() as tmp:
            configs = {}
            for routed in times:
                configs[routed] = Path(tmp) / f"route-by-image-{routed}.yaml"
                cfg[family]["route_by_image"] = routed
                configs[routed].write_text(yaml.safe_dump(cfg))
            common = ("--models", family, "--workers-per-device", "2")
            with server(configs[True], *common) as on, server(configs[False], *common) as off:
                urls = {True: on, False: off}
                for r in range(args.rounds):
                    for routed in (True, False) if r % 2 == 0 else (False, True):
                        seed = 10_000 * (r + 1) + (5_000 if routed else 0)  # images new to both
                        per_image, encoded = round_trip(urls[routed], family, seed, args)
                        times[routed] += per_image
                        runs[routed] += encoded
                        print(family, routed, ms(statistics.median(per_image)), encoded, flush=True)
        images = args.rounds * args.pipelines * args.images
        on, off = (statistics.median(times[k]) for k in (True, False))
        route = f"/{family}/{CASES[family][0]}"
        rows.append(
            [
                route,
                ms(off),
                spread(times[False]),
                f"{runs[False] / images:.2f}",
                ms(on),
                spread(times[True]),
                f"{runs[True] / images:.2f}",
                f"**{off / on:.2f}x**",
            ]
        )
    print(
        ran(
            f"2 workers per server; {args.rounds} rounds per setting, alternating; {args.pipelines} "
            f"pipelines x {args.images} new images x {args.prompts} prompts at once"
        )
    )
    print(
        table(
            [
                "route",
                "least busy: per image p50 ms",
                "spread",
                "encoder runs / image",
                "by image: per image p50 ms",
                "spread",
                "encoder runs / image",
                "speed-up",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
