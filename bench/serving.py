"""Serving overhead and concurrency: every route over HTTP vs the same work in-process.

    python bench/serving.py                # demo config (tiny models): c = 1, 8, 32 and overhead
    python bench/serving.py --full         # full-size random weights: overhead at c = 1

"In-process" is the worker's own work without HTTP: the route's LitAPI object, set up in this
process with the same config and seeded weights, runs ``prepare`` (validation, base64, header
check), ``decode_request`` and ``predict`` (decode, model, response encoding) on the same
payload. The ratio HTTP p50 / in-process p50 is what the server adds: HTTP, JSON, the queue,
the process hop. Both sides alternate in blocks of back-to-back calls (``harness.alternate``);
the HTTP side times request bytes out to response bytes in on a keep-alive connection.
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
    ms,
    p,
    ran,
    server,
    spread,
    table,
)

# isort: split
from apis.config import load_config  # noqa: E402
from apis.server import FAMILIES  # noqa: E402

BLOCK = 3  # timed back-to-back calls per side and round


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
    for family in dict.fromkeys(f for f, _, _ in todo):
        api = FAMILIES[family](cfg)
        api.setup("cpu")
        with server(config, "--models", family) as url:
            client = Client(url)
            for fam, op, payload in (r for r in todo if r[0] == family):
                route_url = f"{url}/{fam}/{op}"
                label = f"/{fam}/{op}" + (
                    f" ({payload['mask_encoding']})" if "mask_encoding" in payload else ""
                )

                def http(client=client, path=f"/{fam}/{op}", body=encode(payload)):
                    return client.post(path, body)

                t_http, t_proc = alternate(
                    http, lambda a=api, o=op, pl=payload: in_process(a, o, pl), rounds, BLOCK
                )
                ratio = statistics.median(t_http) / statistics.median(t_proc)
                overhead_rows.append(
                    [
                        label,
                        ms(statistics.median(t_http)),
                        spread(t_http),
                        ms(statistics.median(t_proc)),
                        spread(t_proc),
                        f"**{ratio:.3f}**",
                    ]
                )
                print(overhead_rows[-1], flush=True)
                if args.load if args.load is not None else not args.full:
                    for c in (1, 8, 32):
                        run = drive(route_url, [payload] * max(2 * c, 16), c)
                        load_rows.append(
                            [
                                label,
                                c,
                                ms(p(run.latencies, 50)),
                                ms(p(run.latencies, 95)),
                                f"{run.throughput:.1f}",
                            ]
                        )
                        print(load_rows[-1], flush=True)
            client.close()
        del api
    print(ran(f"{rounds} alternations of {BLOCK} timed calls"))
    print(
        table(
            ["route", "HTTP p50 ms", "spread", "in-process p50 ms", "spread", "HTTP / in-process"],
            overhead_rows,
        )
    )
    if load_rows:
        print()
        print(table(["route", "concurrency", "p50 ms", "p95 ms", "requests/s"], load_rows))


if __name__ == "__main__":
    main()
