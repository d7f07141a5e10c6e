"""CLIP ``encode_text`` throughput at concurrency 32: batched (max_batch_size 32) vs one at a time.

    python bench/batching.py [--config configs/bench-full.yaml] [--dtypes float32,bfloat16]
        [--rounds 3] [--requests 96]

Two servers with the same model, one batching and one not, are driven in turns (A, B, B, A,
...) so both see the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, drive, ms, p, ran, server, spread, table, timed  # noqa: E402


def with_batch(config: Path, size: int, tmp: Path) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["clip"]["max_batch_size"] = size
    out = tmp / f"clip-batch-{size}.yaml"
    base = config.resolve().parent
    for m in raw["clip"]["models"]:  # keep relative paths working from the temporary file
        if m.get("arch_config"):
            m["arch_config"] = str(base / m["arch_config"])
    out.write_text(yaml.safe_dump({"limits": raw.get("limits", {}), "clip": raw["clip"]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "bench-full.yaml"))
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    texts = [{"text": f"a photo of object number {i} on a table"} for i in range(args.requests)]
    cfg = Path(args.config)
    rows, ceilings = [], []
    for dtype in args.dtypes.split(","):
        runs = compare(cfg, dtype, texts, args.rounds, args.concurrency)
        tps = {name: statistics.median(r.throughput for r in rs) for name, rs in runs.items()}
        for name, rs in runs.items():
            lat = [x for r in rs for x in r.latencies]
            tp = [r.throughput for r in rs]
            rows.append([dtype, name, f"{tps[name]:.1f}", spread(tp), ms(p(lat, 50)), ms(p(lat, 95))])
        ratio = tps["batched"] / tps["one at a time"]
        rows.append([dtype, "**batched / one at a time**", f"**{ratio:.1f}x**", "", "", ""])
        one, batch = model_ceiling(cfg, dtype, [t["text"] for t in texts[: args.concurrency]])
        ceilings.append([dtype, ms(one), ms(batch), f"**{one / batch:.1f}x**"])
    print(
        ran(f"{args.rounds} rounds of {args.requests} requests at concurrency {args.concurrency}, in turns")
    )
    print(table(["dtype", "encode_text", "requests/s (median)", "spread", "p50 ms", "p95 ms"], rows))
    print(f"\nThe model alone in-process, ms per text: {args.concurrency} one by one vs as one batch\n")
    print(table(["dtype", "one by one", "one batch", "the most batching can give"], ceilings))


def compare(cfg: Path, dtype: str, texts: list[dict], rounds: int, concurrency: int) -> dict[str, list]:
    """Throughput runs of a batching and a one-at-a-time server, driven in turns."""
    with tempfile.TemporaryDirectory() as tmp:
        batched_cfg, single_cfg = with_batch(cfg, 32, Path(tmp)), with_batch(cfg, 1, Path(tmp))
        with server(batched_cfg, "--dtype", dtype) as batched, server(single_cfg, "--dtype", dtype) as single:
            urls = {"batched": batched + "/clip/encode_text", "one at a time": single + "/clip/encode_text"}
            for url in urls.values():
                drive(url, texts[:8], 8)  # warm-up
            runs: dict[str, list] = {k: [] for k in urls}
            for i in range(rounds):
                for name in list(urls) if i % 2 == 0 else list(urls)[::-1]:
                    runs[name].append(drive(urls[name], texts, concurrency))
                    print(dtype, name, f"{runs[name][-1].throughput:.1f} req/s", flush=True)
    return runs


def model_ceiling(cfg_path: Path, dtype: str, texts: list[str], rounds: int = 5) -> tuple[float, float]:
    """Median seconds per text of ``encode_texts`` one at a time and as one batch."""
    import torch

    from apis.clip.model import encode_texts, load_clip
    from apis.config import load_config

    cm = load_clip(load_config(cfg_path).clip.models[0], "cpu", getattr(torch, dtype))
    encode_texts(cm, texts)  # warm-up
    single = [timed(lambda t=t: encode_texts(cm, [t])) for t in texts]
    batched = [timed(lambda: encode_texts(cm, texts)) / len(texts) for _ in range(rounds)]
    return statistics.median(single), statistics.median(batched)


if __name__ == "__main__":
    main()
