"""SAM 3 video sessions: a text prompt tracked through a clip, in process and over HTTP.

    python bench/sam3_video.py [--frames N] [--size WxH] [--device cuda]

The tiny model of the tests (``configs/models/sam3-video-tiny.json``, tests/unit/test_sam3_video.py's
random weights with the scores raised so that instances are found and tracked), saved as a
checkpoint in the released layout. In process: the image model loaded as the sam3 family loads
it, the video model built on its detector (``apis/sam3/video.py`` ``video_model``), one session
on the clip, a text prompt on frame 0, then propagation. Over HTTP: a server started here on the
same checkpoint (the sam3 family only, one worker), the same clip as PNG frames through
``clients.sam3_client.Sam3VideoSession``. Reported: time to open the session and to answer the
prompt, time to the first propagated frame, frames/s, instances per frame and the session's
``memory_bytes``. Full-size SAM 3 is not run on a CPU here (its 1008-px detector on every frame).
``--device cuda``: GPU 0 in the server's precision there (bfloat16 where supported), in process
and for the server (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ROOT, ms, ran, server, table  # noqa: E402

# isort: split
import torch  # noqa: E402

from apis.core.precision import resolve_dtype  # noqa: E402
from apis.core.settings import ModelEntry  # noqa: E402
from apis.sam3.model import load_sam3  # noqa: E402
from apis.sam3.video import VideoSession, video_model  # noqa: E402
from tests.unit.test_sam3_video import tiny_model  # noqa: E402

ARCH = ROOT / "configs" / "models" / "sam3-video-tiny.json"
TEXT = "robot arm"


def clip(n: int, width: int, height: int) -> list[np.ndarray]:
    """Noise shifted right by 2 px a frame."""
    base = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return [np.roll(base, 2 * i, axis=1) for i in range(n)]


def in_process(entry: ModelEntry, frames: list[np.ndarray], device: str) -> dict:
    model = video_model(
        load_sam3(entry, "cuda:0" if device == "cuda" else "cpu", resolve_dtype("auto", device))
    )
    out: dict = {}
    t0 = time.perf_counter()
    session = VideoSession.open(model, frames)
    out["open"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    session.add_prompt(0, text=TEXT)
    out["prompt"] = time.perf_counter() - t0
    t0, counts = time.perf_counter(), []
    for result in session.propagate():
        out.setdefault("first", time.perf_counter() - t0)
        counts.append(len(result.objects))
    out["fps"] = len(counts) / (time.perf_counter() - t0)
    out["instances"] = float(np.mean(counts))
    out["memory"] = session.describe()["memory_bytes"]
    session.close()
    return out


def over_http(entry: ModelEntry, frames: list[np.ndarray], device: str) -> dict:
    from clients.sam3_client import Sam3VideoSession

    config = {"sam3": {"workers_per_device": 1, "models": [entry.model_dump(mode="json", exclude_none=True)]}}
    out: dict = {}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(config, f)
        f.flush()
        placement = ["--accelerator", "cuda", "--devices", "1"] if device == "cuda" else []
        with server(f.name, "--models", "sam3", *placement) as url:
            Sam3VideoSession(f"{url}/sam3", frames=frames[:1]).close()  # the video model is built once
            t0 = time.perf_counter()
            with Sam3VideoSession(f"{url}/sam3", frames=frames) as session:
                out["open"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                session.prompt(0, text=TEXT)
                out["prompt"] = time.perf_counter() - t0
                t0, counts = time.perf_counter(), []
                for frame in session.propagate():
                    out.setdefault("first", time.perf_counter() - t0)
                    counts.append(len(frame["objects"]))
                out["fps"] = len(counts) / (time.perf_counter() - t0)
                out["instances"] = float(np.mean(counts))
                out["memory"] = session.info()["memory_bytes"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16, help="clip length")
    ap.add_argument("--size", default="160x120", help="frame size WxH")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: GPU 0")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    frames = clip(args.frames, width, height)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sam3-video-tiny.pt"
        torch.save({"model": tiny_model().state_dict()}, path)
        entry = ModelEntry(name="sam3-video-tiny", weights=str(path), arch_config=ARCH)
        local = in_process(entry, frames, args.device)
        http = over_http(entry, frames, args.device)
    print(
        ran(
            f"sam3-video-tiny (224 px) on {args.device}; a {width}x{height} clip of {args.frames} frames, "
            "text on frame 0"
        )
    )
    rows = [
        [
            side,
            ms(r["open"]),
            ms(r["prompt"]),
            ms(r["first"]),
            f"{r['fps']:.2f}",
            f"{r['instances']:.1f}",
            f"{r['memory'] / 2**20:.1f}",
        ]
        for side, r in (("in process", local), (f"HTTP ({http['fps'] / local['fps']:.2f}x)", http))
    ]
    header = [
        "side",
        "open (ms)",
        "prompt (ms)",
        "first frame (ms)",
        "frames/s",
        "instances/frame",
        "memory (MB)",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
