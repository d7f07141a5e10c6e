"""A SAM 2 click on an embedded image with the decoder on all torch threads or on one.

    python -m bench.click_threads [--work DIR] [--rounds 8] [--threads 0,1]

Starts one server per ``sam2.prompt_threads`` value at once (``bench/peer_roboflow.py``'s
config: the seeded SAM 2.1 hiera_large checkpoint it made under the same ``--work``, one
worker), embeds the same photo in each and sends compact clicks (``best_only``, ``coco_rle``,
no low-res logits) at c = 1, in turns with ``SAM2ImagePredictor.predict`` on the same
checkpoint in this process: each round a block of 3 timed clicks per side after one untimed
one, the order reversed every round. Wall time of a click and the CPU time it cost (the
server's whole process tree, or this process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import peer_roboflow as rf  # noqa: E402  (first: harness sets the workers' OpenMP settings)
from bench.harness import Client, encode, ms, ran, server, table  # noqa: E402
from bench.peers import CACHE, load_average  # noqa: E402
from clients.common import decode_array  # noqa: E402

BLOCK = 3


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call; ``fn`` answers the CPU seconds it cost."""
    t0 = time.perf_counter()
    cpu = fn()
    return time.perf_counter() - t0, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=CACHE / "work", help="bench/peer_roboflow.py's --work")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", default="0,1", help="sam2.prompt_threads values, one server each")
    args = ap.parse_args()
    work = args.work / "roboflow"
    if not rf.weights(work).is_file():
        sys.exit(f"no checkpoint at {rf.weights(work)}: run `python -m bench.peer_roboflow` once first")
    first = rf.images()[0]
    key = rf.image_id(first)
    model = rf.InProcess(work)
    before = load_average()
    with ExitStack() as stack:
        sides: dict[str, Callable[[], float]] = {}
        scores = {}
        for n in args.threads.split(","):
            config = rf.ours_config(work)
            config["sam2"]["prompt_threads"] = int(n)
            path = work / f"visionserve-threads{n}.yaml"
            path.write_text(yaml.safe_dump(config))
            url = stack.enter_context(server(path, "--models", "sam2"))
            client = Client(url)
            client.post("/sam2/embed", encode({"image": rf.b64(first)}))
            answer = json.loads(client.post("/sam2/prompt_mask", encode(rf.ours_body(rf.click(0), key=key))))
            scores[n] = float(decode_array(answer["iou_predictions"], answer["iou_shape"])[0])
            clicks = iter(range(1, 10**6))

            def click(client: Client = client, url: str = url, clicks=clicks) -> float:
                spent = rf.session_cpu(url)
                client.post("/sam2/prompt_mask", encode(rf.ours_body(rf.click(next(clicks)), key=key)))
                return rf.session_cpu(url) - spent

            sides[f"visionserve, prompt_threads: {n}"] = click

        def in_process() -> float:
            c0 = time.process_time()
            model.clicks(1)
            return time.process_time() - c0

        sides["SAM2ImagePredictor.predict in this process"] = in_process
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        names = list(sides)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                sides[name]()
                times[name] += [timed(sides[name]) for _ in range(BLOCK)]
    library = model.best_score(rf.click(0))
    print(
        f"\n{ran('a SAM 2.1 hiera_large click on an embedded 1024x768 image, c = 1').strip()}; "
        f"{args.rounds} rounds of {BLOCK} clicks per side in turns; load average (1/5/15 min) "
        f"{before} before, {load_average()} after. Best score of the first click: "
        + ", ".join(f"prompt_threads {n}: {s:.8f}" for n, s in scores.items())
        + f", in process {library:.8f}.\n"
    )
    rows = [
        [
            name,
            ms(statistics.median(t[0] for t in v)),
            ms(statistics.median(t[1] for t in v)),
            len(v),
        ]
        for name, v in times.items()
    ]
    print(table(["side", "p50 ms", "CPU ms per click (p50)", "clicks"], rows))


if __name__ == "__main__":
    main()
