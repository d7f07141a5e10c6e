"""Serving overhead and concurrency: every route over HTTP vs the same work in-process.

    python bench/serving.py                # demo config (tiny models): c = 1, 8, 32 and overhead
    python bench/serving.py --full         # full-size random weights: overhead at c = 1
    python bench/serving.py --full --device cuda   # the same on GPU 0 (scripts/gpu_check.sh)
    python bench/serving.py --sides litserve,zmq,ours   # LitServe default, fast_queue, ours

Each side (``harness.SIDES``) is one server per family, in turn; the LitServe sides
are ``bench/litserve_sides.py``, plain LitAPIs running the same family code.

"In-process" is the worker's own work without HTTP: the route's LitAPI object, set up in this
process with the same config and seeded weights, runs ``job_for`` (validation, base64, header
check), then the worker's ``answer`` (decode, model, the answer rendered to bytes) on the same
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
    SIDES,
    Client,
    alternate,
    drive,
    encode,
    floor_server,
    ms,
    p,
    ran,
    side_server,
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
    """The worker's whole work for one request in this process: the job built as the HTTP
    process builds it, then the family's ``answer`` (decode, model, encode, rendered bytes)."""
    route = api.handlers[op]
    job = api.job_for(route, route.request.model_validate(payload))
    (reply,) = api.answer([job])
    if reply.status != 200:
        raise RuntimeError(f"in-process {op} failed: {bytes(reply.body)[:300]!r}")
    return reply


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
    ap.add_argument(
        "--sides",
        default="ours",
        help="comma-separated, in order: " + ", ".join(f"{k} ({v})" for k, v in SIDES.items()),
    )
    ap.add_argument("--ops", default=None, help="comma-separated subset of routes (op names)")
    ap.add_argument("--concurrency", default="1,8,32", help="load levels (with --load)")
    args = ap.parse_args()
    config = ROOT / "configs" / ("bench-full.yaml" if args.full else "demo.yaml")
    rounds = args.rounds or (3 if args.full else 10)
    cfg = load_config(config)
    wanted = set(args.families.split(",")) if args.families else None
    ops = set(args.ops.split(",")) if args.ops else None
    todo = [
        r for r in routes(args.full) if (wanted is None or r[0] in wanted) and (ops is None or r[1] in ops)
    ]
    families = list(dict.fromkeys(f for f, _, _ in todo))
    sides = args.sides.split(",")
    overhead_rows, load_rows = [], []
    with floor_server() as floor_url:
        floor = Client(floor_url)
        for family in families:  # one family at a time: full-size models are large
            api = FAMILIES[family].api_class()(cfg)  # the in-process side, for every server side
            api.setup("cuda:0" if args.device == "cuda" else "cpu")
            mine = [r for r in todo if r[0] == family]
            for side in sides:
                served = sorted({op for _, op, _ in mine})
                with side_server(side, config, [family], served, cuda=args.device == "cuda") as url:
                    client = Client(url)
                    for fam, op, payload in mine:
                        label = f"/{fam}/{op}" + (
                            f" ({payload['mask_encoding']})" if "mask_encoding" in payload else ""
                        )
                        cells = overhead(client, floor, api, op, payload, rounds)
                        overhead_rows.append([label, SIDES[side], *cells])
                        print(overhead_rows[-1], flush=True)
                        if args.load if args.load is not None else not args.full:
                            for c in (int(c) for c in args.concurrency.split(",")):
                                run = drive(f"{url}/{fam}/{op}", [payload] * max(2 * c, 16), c)
                                row = [
                                    label,
                                    SIDES[side],
                                    c,
                                    ms(p(run.latencies, 50)),
                                    ms(p(run.latencies, 95)),
                                ]
                                load_rows.append([*row, f"{run.throughput:.1f}"])
                                print(load_rows[-1], flush=True)
                    client.close()
            del api
    order = list(dict.fromkeys(r[0] for r in overhead_rows))  # routes, then sides in their order
    overhead_rows.sort(key=lambda r: order.index(r[0]))
    load_rows.sort(key=lambda r: (order.index(r[0]), r[2]))
    print(ran(f"{rounds} alternations of {BLOCK} timed calls"))
    print(
        table(
            [
                "route",
                "side",
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
        print(table(["route", "side", "concurrency", "p50 ms", "p95 ms", "requests/s"], load_rows))


if __name__ == "__main__":
    main()
