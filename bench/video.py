"""SAM 2 video sessions: offline propagation speed, live per-frame latency, memory per session.

    python bench/video.py [--full] [--frames N] [--live-frames N] [--size WxH] [--device cuda]
    python bench/video.py --http [--full] [--frames N] [--live-frames N]
    python bench/video.py --url http://host:port [--api-key KEY] [--full] [--frames N] [--live-frames N]

In process (``apis/sam2/video.py`` on the model the sam2 family loads): one clip of
``--frames`` frames, one click on frame 0, then

1. offline: time to open the session, to answer the prompt, to the first propagated frame,
   and frames/s over the whole propagation; the session's ``memory_bytes``;
2. live: a live session fed ``--live-frames`` frames one by one after a click on its first
   frame (the clip repeated): per-frame latency (median, p90) and, every tenth of the run,
   the session's ``memory_bytes`` and the process RSS; flat numbers mean the session forgets
   what the model's memory window no longer reads.

``--http`` (a server started here with only the sam2 family on the same model, one worker) or
``--url`` (a running server): the same over HTTP, through the routes of
``/sam2/video/sessions`` and ``clients.sam2_client.Sam2VideoSession``, next to the in-process
numbers measured in the same run: propagation frames/s against in-process (ratio), time to the
first streamed frame, live per-frame latency.

The tiny model is the test one (``configs/models/sam2-tiny.json``), ``--full`` SAM 2.1-L; both
with seeded random weights (the masks are meaningless, the compute is the real one).
``--device cuda``: GPU 0 in the server's precision there (bfloat16 where supported), in process
and for the server (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, p, ran, server, table  # noqa: E402

# isort: split
import torch  # noqa: E402

from apis.core.precision import resolve_dtype  # noqa: E402
from apis.core.process import reuse_freed_memory  # noqa: E402
from apis.core.settings import ModelEntry  # noqa: E402
from apis.sam2.model import load_sam2  # noqa: E402
from apis.sam2.video import VideoSession  # noqa: E402

TINY = ModelEntry(
    name="sam2-tiny", weights="random", arch_config=ROOT / "configs" / "models" / "sam2-tiny.json"
)
FULL = ModelEntry(name="sam2.1_hiera_l", weights="random")


def clip(n: int, width: int, height: int) -> list[np.ndarray]:
    """A disc crossing a textured background, one position per frame."""
    yy, xx = np.mgrid[:height, :width]
    background = ((np.sin(xx / 9.0) + np.cos(yy / 7.0)) * 40 + 100)[..., None].repeat(3, axis=2)
    out = []
    for t in range(n):
        img = background.copy()
        disc = (xx - width // 4 - 3 * t) ** 2 + (yy - height // 2) ** 2 < (height // 6) ** 2
        img[disc] = (230, 60, 40)
        out.append(img.astype(np.uint8))
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def offline(model, frames: list[np.ndarray], point: list[float], dtype: torch.dtype) -> dict:
    t0 = time.perf_counter()
    session = VideoSession.open(model, frames, dtype=dtype)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    session.add_prompt(0, 1, points=[point], labels=[1])
    t_prompt = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in session.propagate():
        count += 1
        first = first if first is not None else time.perf_counter() - t0
    total = time.perf_counter() - t0
    memory = session.describe()["memory_bytes"]
    session.close()
    return {"open": t_open, "prompt": t_prompt, "first": first, "fps": count / total, "memory": memory}


def live(
    model, frames: list[np.ndarray], point: list[float], n: int, dtype: torch.dtype
) -> tuple[list[float], list[list[object]]]:
    """Per-frame seconds and the memory rows (frame, session MB, RSS MB) every n/10 frames."""
    session = VideoSession.open(model, None, dtype=dtype)
    session.add_frame(frames[0])
    session.add_prompt(0, 1, points=[point], labels=[1])
    times, rows = [], []
    every = max(1, n // 10)
    for i in range(1, n):
        t0 = time.perf_counter()
        session.add_frame(frames[i % len(frames)])
        times.append(time.perf_counter() - t0)
        if (i + 1) % every == 0 or i == n - 1:
            info = session.describe()
            rows.append([i + 1, mb(info["memory_bytes"]), f"{rss_mb():.0f}", info["frames_held"]])
    session.close()
    return times, rows


def over_http(
    url: str, api_key: str | None, frames: list[np.ndarray], point: list[float], n_live: int
) -> dict:
    """The offline and live runs through the HTTP routes (an MP4 of the same frames)."""
    import cv2

    from clients.sam2_client import Sam2VideoSession

    height, width = frames[0].shape[:2]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
        data = path.read_bytes()
    out: dict = {}
    with Sam2VideoSession(f"{url}/sam2", video=data, api_key=api_key) as session:
        session.prompt(0, 1, points=[point], labels=[1])
        t0 = time.perf_counter()
        count = 0
        for _ in session.propagate():
            count += 1
            out.setdefault("first", time.perf_counter() - t0)
        out["fps"] = count / (time.perf_counter() - t0)
    with Sam2VideoSession(f"{url}/sam2", api_key=api_key) as session:
        session.add_frame(_png(frames[0]))
        session.prompt(0, 1, points=[point], labels=[1])
        times = []
        for i in range(1, n_live):
            t0 = time.perf_counter()
            session.add_frame(_png(frames[i % len(frames)]))
            times.append(time.perf_counter() - t0)
        out["live"] = times
        out["memory"] = session.info().get("memory_bytes")
    return out


@contextlib.contextmanager
def served(entry: ModelEntry, max_frames: int, cuda: bool) -> Iterator[str]:
    """``app.py`` with the sam2 family only, on ``entry``, one worker; yields its URL."""
    config = {
        "sam2": {
            "workers_per_device": 1,
            "video": {"max_frames": max_frames},
            "models": [entry.model_dump(mode="json", exclude_none=True)],
        }
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        placement = ["--accelerator", "cuda", "--devices", "1"] if cuda else []
        with server(f.name, "--models", "sam2", *placement) as url:
            yield url


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--full", action="store_true", help="SAM 2.1-L (random weights) instead of the tiny model"
    )
    ap.add_argument("--frames", type=int, help="clip length (default 24, --full 4)")
    ap.add_argument("--live-frames", type=int, help="live frames (default 200, --full 4)")
    ap.add_argument("--size", default="320x240", help="frame size WxH")
    ap.add_argument(
        "--url", help="also run over HTTP against this server (sam2 family loaded with the same model)"
    )
    ap.add_argument("--http", action="store_true", help="also run over HTTP against a server started here")
    ap.add_argument("--api-key")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    n_frames = args.frames or (4 if args.full else 24)
    n_live = args.live_frames or (4 if args.full else 200)
    width, height = (int(v) for v in args.size.split("x"))
    frames = clip(n_frames, width, height)
    point = [width / 4, height / 2]

    reuse_freed_memory()  # as in a worker
    entry = FULL if args.full else TINY
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = load_sam2(entry, "cuda:0" if args.device == "cuda" else "cpu").model
    dtype = resolve_dtype("auto", args.device)
    name = f"{entry.name} (random weights, {str(dtype).removeprefix('torch.')}, {model.image_size} px)"

    off = offline(model, frames, point, dtype)
    times, rows = live(model, frames, point, n_live, dtype)
    print(ran(f"{name}; a {width}x{height} clip of {n_frames} frames, one click on frame 0; in process"))
    print(
        table(
            ["open (ms)", "prompt (ms)", "first frame (ms)", "propagation (frames/s)", "session memory (MB)"],
            [[ms(off["open"]), ms(off["prompt"]), ms(off["first"]), f"{off['fps']:.2f}", mb(off["memory"])]],
        )
    )
    median, p90 = ms(statistics.median(times)), ms(p(times, 90))
    print(f"\nLive, {n_live} frames: per frame median {median} ms, p90 {p90} ms\n")
    print(table(["frames", "session memory (MB)", "process RSS (MB)", "frames held"], rows))
    if args.url or args.http:
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(served(entry, max(n_frames, n_live), args.device == "cuda"))
            http = over_http(url, args.api_key, frames, point, n_live)
        print(ran(f"{name}; the same clip and clicks over HTTP ({'this server' if args.http else url})"))
        print(
            table(
                ["side", "propagation (frames/s)", "first frame (ms)", "live median (ms)", "live p90 (ms)"],
                [
                    [
                        "in process",
                        f"{off['fps']:.2f}",
                        ms(off["first"]),
                        ms(statistics.median(times)),
                        ms(p(times, 90)),
                    ],
                    [
                        f"HTTP ({http['fps'] / off['fps']:.2f}x)",
                        f"{http['fps']:.2f}",
                        ms(http["first"]),
                        ms(statistics.median(http["live"])),
                        ms(p(http["live"], 90)),
                    ],
                ],
            )
        )


if __name__ == "__main__":
    main()
