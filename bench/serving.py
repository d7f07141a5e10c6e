"""Serving overhead and concurrency: every route over HTTP vs the same work in-process.

    python bench/serving.py                # demo config (tiny models): c = 1, 8, 32 and overhead
    python bench/serving.py --full         # full-size random weights: overhead at c = 1
    python bench/serving.py --full --device cuda   # the same on GPU 0 (scripts/gpu_check.sh)

"In-process" is the worker's own work without HTTP: the route's LitAPI object, set up in this
process with the same config and seeded weights, runs ``prepare`` (validation, base64, header
check), ``decode_request`` and ``predict`` (decode, model, response encoding) on the same
payload. The ratio HTTP p50 / in-process p50 is what the server adds: HTTP, JSON, the queue,
the process hop. Both sides alternate in blocks of back-to-back calls (``harness.alternate``);
the HTTP side times request bytes out to response bytes in on a keep-alive connection.

"uvicorn alone" (``bench/floor.py``) then takes the same request bytes and answers as many bytes
as the route did, doing nothing else: the part of the HTTP time no server on this stack can
remove. (in-process + uvicorn alone) / in-process is the lowest ratio a route can reach here.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    ROOT,
    Client,
    alternate,
    drive,
    encode,
    floor_server,
    ms,
    p,
    ran,
    server,
    spread,
    table,
    timed,
)

# isort: split
from apis.config import load_config  # noqa: E402
from apis.families import FAMILIES  # noqa: E402

BLOCK = 3  # timed back-to-back calls per side and round
FLOOR_CALLS = 30  # timed calls to uvicorn alone per route


def photo(h: int = 480, w: int = 640, seed: int = 0) -> str:
    yy, xx = np.mgrid[:h, :w]
    base = (np.sin(xx / 23.0 + seed) + np.cos(yy / 17.0)) * 60 + 128
    noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def routes(full: bool) -> list[tuple[str, str, dict]]:
    img = photo()
    size = 336 if full else 224
    return [
        ("clip", "extract", {"image": img, "load_size": size}),
        ("clip", "encode_text", {"text": "a photo of a robot arm"}),
        ("clip", "similarity", {"image": img, "text": "a mug", "load_size": size}),
        ("dino", "extract", {"image": img, "load_size": size}),
        ("sam2", "prompt_mask", {"image": img, "point_coords": [[320, 240]], "point_labels": [1]}),
        (
            "sam2",
            "prompt_mask",
            {"image": img, "point_coords": [[320, 240]], "point_labels": [1], "mask_encoding": "packbits"},
        ),
        ("sam2", "auto_mask", {"image": img, "preset": "coarse", "points_per_side": 4 if full else 8}),
        ("sam3", "predict", {"image": img, "prompts": ["mug", "robot"]}),
        *([] if full else [("rmbg", "remove", {"image": img})]),
    ]


def in_process(api, op: str, payload: dict):
    route = next(r for r in api.routes if r.op == op)
    job = api.prepare(op, route.request.model_validate(payload))
    out = api.predict([api.decode_request(job)] if api.max_batch_size > 1 else api.decode_request(job))
    out = out[0] if isinstance(out, list) else out
    if not isinstance(out, dict):
        raise RuntimeError(f"in-process {op} failed: {out}")
    return out


def overhead(client: Client, floor: Client, api, op: str, payload: dict, rounds: int) -> list[str]:
    """HTTP vs in-process (alternated), then uvicorn alone with the same bytes: table cells."""
    path, body = f"/{api.family}/{op}", encode(payload)
    t_http, t_proc = alternate(
        lambda: client.post(path, body), lambda: in_process(api, op, payload), rounds, BLOCK
    )
    answer = f"/{len(client.post(path, body))}"
    floor.post(answer, body)
    t_floor = [timed(lambda: floor.post(answer, body)) for _ in range(FLOOR_CALLS)]
    http, proc, alone = (statistics.median(t) for t in (t_http, t_proc, t_floor))
    return [
        ms(http),
        spread(t_http),
        ms(proc),
        spread(t_proc),
        f"**{http / proc:.3f}**",
        ms(alone),
        f"{(proc + alone) / proc:.3f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="full-size models (configs/bench-full.yaml)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"alternations per route, {BLOCK} timed calls each (default 10 / 3)",
    )
    ap.add_argument("--families", default=None, help="comma-separated subset")
    ap.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the server's workers and the in-process side run (cuda: GPU 0, dtype auto)",
    )
    ap.add_argument(
        "--load",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also p50/p95/throughput at concurrency 1, 8, 32 (default: on for the demo config)",
    )
    args = ap.parse_args()
    config = ROOT / "configs" / ("bench-full.yaml" if args.full else "demo.yaml")
    rounds = args.rounds or (3 if args.full else 10)
    cfg = load_config(config)
    wanted = set(args.families.split(",")) if args.families else None
    todo = [r for r in routes(args.full) if wanted is None or r[0] in wanted]
    overhead_rows, load_rows = [], []
    with floor_server() as floor_url:
        floor = Client(floor_url)
        for family in dict.fromkeys(f for f, _, _ in todo):
            api = FAMILIES[family].api_class()(cfg)
            api.setup("cuda:0" if args.device == "cuda" else "cpu")
            placement = ["--accelerator", "cuda", "--devices", "1"] if args.device == "cuda" else []
            with server(config, "--models", family, *placement) as url:
                client = Client(url)
                for fam, op, payload in (r for r in todo if r[0] == family):
                    label = f"/{fam}/{op}" + (
                        f" ({payload['mask_encoding']})" if "mask_encoding" in payload else ""
                    )
                    overhead_rows.append([label, *overhead(client, floor, api, op, payload, rounds)])
                    print(overhead_rows[-1], flush=True)
                    if args.load if args.load is not None else not args.full:
                        for c in (1, 8, 32):
                            run = drive(f"{url}/{fam}/{op}", [payload] * max(2 * c, 16), c)
                            row = [label, c, ms(p(run.latencies, 50)), ms(p(run.latencies, 95))]
                            load_rows.append([*row, f"{run.throughput:.1f}"])
                            print(load_rows[-1], flush=True)
                client.close()
            del api
    print(ran(f"{rounds} alternations of {BLOCK} timed calls"))
    print(
        table(
            [
                "route",
                "HTTP p50 ms",
                "spread",
                "in-process p50 ms",
                "spread",
                "HTTP / in-process",
                "uvicorn alone ms",
                "lowest possible ratio",
            ],
            overhead_rows,
        )
    )
    if load_rows:
        print()
        print(table(["route", "concurrency", "p50 ms", "p95 ms", "requests/s"], load_rows))


if __name__ == "__main__":
    main()
