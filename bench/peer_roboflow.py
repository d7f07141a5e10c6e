"""Roboflow Inference as a peer of ``bench/peers.py``: SAM 2 clicks, the call a labelling tool
makes many times a second.

    python bench/peers.py --peer roboflow --venvs /work/peer-venvs --work /work/peer-work
    python -m bench.peer_roboflow --venvs /work/peer-venvs --work /work/peer-work   # the rest

Roboflow Inference 1.8.3 (``inference-cpu[http,sam]``, in its own virtualenv) serves SAM 2 at
``/sam2/embed_image`` and ``/sam2/segment_image``; visionserve at ``/sam2/embed`` and
``/sam2/prompt_mask``. Both load one checkpoint file: SAM 2.1 hiera_large with random weights,
built by sam2's own builder under a fixed seed and saved where Roboflow's model cache looks
(``$MODEL_CACHE_DIR/sam2/hiera_large/weights.pt``, ``{"model": state_dict}``); visionserve is
given the same file as its ``sam2.1_hiera_l`` checkpoint. Roboflow's legacy SAM 2 class builds
``hiera_large`` from the SAM 2.0 config; the app it runs here (its ``cpu_http`` app, written
below with stream and active-learning parts off) builds it from the 2.1 config in its venv, so
both run the same architecture with the same weights: the best score for a click is the same on
both (``python -m bench.peer_roboflow`` checks and prints it).

Each side is asked for its compact answer: Roboflow's ``format: "rle"`` (its best mask of three,
COCO RLE), ours ``best_only`` + ``mask_encoding: coco_rle`` + no low-res logits. A click on an
embedded image sends the id: ours only the id; Roboflow's request model requires an ``image``
too, which it does not read when the id is cached, so it gets an empty one (its best case).

``python -m bench.peer_roboflow`` measures what ``bench/peers.py`` does not: start-up to ready,
the bytes of one click's answer, the best score on both servers and in-process
(``SAM2ImagePredictor.predict`` on the same checkpoint, the image set once), and each server's
click next to that in-process click, taken in turns while the server runs (the model's own time
for a click, on the same machine at the same moment).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import suppress
from functools import cache
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Client, alternate, drive, encode, ms, server, table  # noqa: E402
from bench.image_id import photo  # noqa: E402
from bench.peers import CACHE, Workload, cpu_name, load_average, serving  # noqa: E402
from clients.common import decode_array  # noqa: E402
from clients.masks import decode_rle  # noqa: E402

VERSION = "1.8.3"
NAME = f"Roboflow Inference {VERSION}"
READY_PATH = "/readiness"
PACKAGES = [f"inference-cpu[http,sam]=={VERSION}", "torch==2.14.1", "torchvision==0.29.1"]
SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"  # in sam2 and in Roboflow's rf-sam-2 alike
SEED = 0
NEW_IMAGES = 2  # images encoded per run of the "new image" row (plus one already cached)
CLICKS = 16  # clicks per run at c = 1 (and twice that at c = 4)
ALONE_CLICKS = 8  # clicks per timed call of the in-process model

# Roboflow's docker/config/cpu_http.py, without the stream manager and active learning (both off
# here), building hiera_large from the SAM 2.1 config (its legacy class names the 2.0 one).
APP = f'''"""Roboflow Inference's HTTP app for bench/peer_roboflow.py (written by it)."""
import inference.models.sam2.segment_anything2 as sam2_model
from inference.core.interfaces.http.http_api import HttpInterface
from inference.core.managers.base import ModelManager
from inference.core.managers.decorators.fixed_size_cache import WithFixedSizeCache
from inference.core.registries.roboflow import RoboflowModelRegistry
from inference.models.utils import ROBOFLOW_MODEL_TYPES

_build_sam2 = sam2_model.build_sam2


def _build_sam2_1(config, *args, **kwargs):
    return _build_sam2({SAM2_CONFIG!r} if config == "sam2_hiera_l.yaml" else config, *args, **kwargs)


sam2_model.build_sam2 = _build_sam2_1
registry = RoboflowModelRegistry(ROBOFLOW_MODEL_TYPES)
app = HttpInterface(WithFixedSizeCache(ModelManager(model_registry=registry), max_size=8)).app
'''
APP_MODULE = "roboflow_app"

# Its offline settings: no key, no download, no telemetry; the model loaded before /readiness.
ENV = {
    "USE_INFERENCE_MODELS": "False",
    "MODELS_CACHE_AUTH_ENABLED": "False",
    "OFFLINE_MODE": "True",
    "ACTIVE_LEARNING_ENABLED": "False",
    "ENABLE_STREAM_API": "False",
    "DISABLE_VERSION_CHECK": "True",
    "METRICS_ENABLED": "False",
    "SAM2_VERSION_ID": "hiera_large",
    "DEVICE": "cpu",
    "PRELOAD_MODELS": "sam2/hiera_large",
}
# The folders its app mounts, which exist only in its docker image.
STATIC = ["inference/landing/out/static", "inference/landing/out/_next/static"]

# The weights: sam2's builder, seeded, run in a child process so this one does not keep them.
BUILD = f"""
import sys, torch
from sam2.build_sam import build_sam2
torch.manual_seed({SEED})
torch.save({{"model": build_sam2({SAM2_CONFIG!r}, None, device="cpu").state_dict()}}, sys.argv[1])
"""


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install(venv: Path) -> None:
    """``inference-cpu[http,sam]`` and its torch pair into ``venv``, unless already there."""
    check = f"import importlib.metadata as m; assert m.version('inference-cpu') == {VERSION!r}"
    if (
        python(venv).exists()
        and subprocess.run([python(venv), "-c", check], capture_output=True).returncode == 0
    ):
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python(venv), "-m", "pip", "install", "-q", *PACKAGES], check=True)


def weights(workdir: Path) -> Path:
    """Where Roboflow's cache looks for ``sam2/hiera_large`` under ``MODEL_CACHE_DIR=workdir``."""
    return workdir / "sam2" / "hiera_large" / "weights.pt"


def prepare(venv: Path, workdir: Path) -> None:
    """The seeded random checkpoint, the app file and the empty folders it mounts."""
    path = weights(workdir)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", BUILD, str(path)], check=True)
    (workdir / f"{APP_MODULE}.py").write_text(APP)
    for folder in STATIC:
        (workdir / folder).mkdir(parents=True, exist_ok=True)


def command(venv: Path, workdir: Path, port: int) -> tuple[list[str], dict[str, str]]:
    argv = [
        str(python(venv)),
        "-m",
        "uvicorn",
        f"{APP_MODULE}:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    return argv, {**ENV, "MODEL_CACHE_DIR": str(workdir)}


def ours_config(workdir: Path) -> dict:
    """sam2.1_hiera_l from the same checkpoint file; one worker, as Roboflow runs one process."""
    model = {"name": "sam2.1_hiera_l", "weights": str(weights(workdir))}
    return {"sam2": {"max_batch_size": 8, "cache_size": 16, "models": [model]}}


# ----------------------------------------------------------------------------- the requests

COMPACT = {"best_only": True, "mask_encoding": "coco_rle", "return_low_res_masks": False}


@cache
def images() -> list[bytes]:
    """The 1024x768 JPEG the clicks go to, then ``NEW_IMAGES`` more: the same photo with one
    corner block changed, so each is a new file (a new id, a new encode) of nearly the same content."""
    first = photo("JPEG")
    pixels = np.array(Image.open(io.BytesIO(first)))
    out = [first]
    for i in range(NEW_IMAGES):
        pixels[:16, :16] = 60 * (i + 1)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def click(i: int) -> list[float]:
    """The i-th click: one point on a 5 x 4 grid over the image (bench/clicks.py's), so
    consecutive clicks differ."""
    return [150.0 + 700 * (i % 5) / 4, 120.0 + 500 * (i // 5 % 4) / 3]


def image_id(data: bytes) -> str:
    """Ours is the file's SHA-256; Roboflow takes the client's, so it gets the same."""
    return hashlib.sha256(data).hexdigest()


def peer_body(point: list[float], data: bytes | None = None, key: str | None = None) -> dict:
    """Roboflow's click: its best mask of three as COCO RLE. ``data`` None: an embedded image,
    named by ``key``, with the empty image its request model requires and does not read."""
    image = {"type": "base64"} if data is None else {"type": "base64", "value": b64(data)}
    return {
        "image": image,
        **({"image_id": key} if key else {}),
        "prompts": [{"points": [{"x": point[0], "y": point[1], "positive": True}]}],
        "multimask_output": True,
        "format": "rle",
        "sam2_version_id": "hiera_large",
    }


def ours_body(point: list[float], data: bytes | None = None, key: str | None = None) -> dict:
    """Our compact click: the best mask as COCO RLE, no low-res logits."""
    source = {"image": b64(data)} if data is not None else {"image_id": key}
    return {**source, "point_coords": [point], "point_labels": [1], **COMPACT}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class InProcess:
    """sam2's ``SAM2ImagePredictor`` in this process on the same checkpoint, the image set once:
    the model's own time for a click."""

    def __init__(self, workdir: Path):
        import torch
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.torch = torch
        self.pred = SAM2ImagePredictor(build_sam2(SAM2_CONFIG, str(weights(workdir)), device="cpu"))
        with torch.inference_mode():
            self.pred.set_image(np.array(Image.open(io.BytesIO(images()[0])).convert("RGB")))
        self.i = 0

    def best_score(self, point: list[float]) -> float:
        with self.torch.inference_mode():
            _, scores, _ = self.pred.predict(
                point_coords=np.asarray([point], np.float32), point_labels=np.ones(1, np.int32)
            )
        return float(scores.max())

    def clicks(self, n: int) -> None:
        for _ in range(n):
            self.best_score(click(self.i))
            self.i += 1

    def four_ways(self, rounds: int) -> list[list[str]]:
        """Four clicks in this process one after another, as one batched ``predict`` (B = 4
        prompts on the image) and on four threads at once (as Roboflow's thread pool runs four
        requests): wall and CPU time per click, medians of ``rounds`` after one untimed round."""
        from concurrent.futures import ThreadPoolExecutor

        points = np.asarray([click(i) for i in range(4)], np.float32)
        one = np.ones(1, np.int32)
        pool = ThreadPoolExecutor(4)

        def single(pt: np.ndarray) -> object:
            return self.pred.predict(point_coords=pt[None], point_labels=one)

        ways = {
            "one after another": lambda: [single(pt) for pt in points],
            "one batched predict (4 prompts)": lambda: self.pred.predict(
                point_coords=points[:, None], point_labels=np.ones((4, 1), np.int32)
            ),
            "4 threads at once": lambda: list(pool.map(single, points)),
        }
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
        with self.torch.inference_mode():
            for r in range(rounds + 1):
                for name, fn in ways.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    if r:
                        times[name].append((time.perf_counter() - t0, time.process_time() - c0))
        pool.shutdown()
        return [
            [
                name,
                ms(statistics.median(t[0] for t in v) / 4),
                f"{statistics.median(t[1] for t in v) / 4:.3f}",
            ]
            for name, v in times.items()
        ]


def workloads(workdir: Path) -> list[Workload]:
    """New image first: its warm-up request encodes the photo the click rows then use (both
    servers cache it under its SHA-256), and each of its runs starts with that photo (a click
    on a cached image), then ``NEW_IMAGES`` new files: its p50 is an encode plus a click."""
    first, *new = images()
    key = image_id(first)
    files = [first, *new]
    alone: list[InProcess] = []

    def model_alone() -> None:
        if not alone:
            alone.append(InProcess(workdir))  # built and the image set on the warm-up call
        alone[0].clicks(ALONE_CLICKS)

    clicks = [click(i) for i in range(20)]
    return [
        Workload(
            "new image, encode + click",
            1,
            len(files),
            "/sam2/segment_image",
            [peer_body(click(i), f, image_id(f)) for i, f in enumerate(files)],
            "/sam2/prompt_mask",
            [ours_body(click(i), f) for i, f in enumerate(files)],
        ),
        Workload(
            "click on an embedded image",
            1,
            CLICKS,
            "/sam2/segment_image",
            [peer_body(pt, key=key) for pt in clicks],
            "/sam2/prompt_mask",
            [ours_body(pt, key=key) for pt in clicks],
            model_alone=model_alone,
            model_alone_requests=ALONE_CLICKS,
            model_alone_label="SAM2ImagePredictor.predict alone, in-process",
        ),
        Workload(
            "clicks on an embedded image",
            4,
            2 * CLICKS,
            "/sam2/segment_image",
            [peer_body(pt, key=key) for pt in clicks],
            "/sam2/prompt_mask",
            [ours_body(pt, key=key) for pt in clicks],
        ),
    ]


# ----------------------------------------------------------------------------- what peers.py does not time

ALTERNATIONS = 4  # rounds of 3 timed HTTP clicks and 3 in-process ones, in turns


def session_cpu(url: str) -> float:
    """CPU seconds (user + system) spent so far by the server listening at ``url`` and every
    process of its session (visionserve's workers): what a click costs the machine, which on a
    shared machine, unlike wall time, does not grow with the number of threads a server runs."""
    port = int(url.rsplit(":", 1)[1])
    listener = next(
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    )
    session, total = os.getsid(listener), 0.0
    for proc in psutil.process_iter():
        with suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == session:
                t = proc.cpu_times()
                total += t.user + t.system
    return total


def one_side(side: str, venv: Path, workdir: Path, config: Path, model: InProcess) -> dict:
    """Start one server (seconds to ready) and encode the photo; click its first point (the
    answer's bytes, best score and mask); then clicks over HTTP at c = 1 alternated with the
    same clicks in this process (``harness.alternate``), and 4 at once next to the model's rate."""
    first = images()[0]
    key = image_id(first)
    make = peer_body if side == "peer" else ours_body
    t0 = time.perf_counter()
    with serving(sys.modules[__name__], venv, workdir) if side == "peer" else server(config) as url:
        ready = time.perf_counter() - t0
        client = Client(url)
        if side == "peer":
            path = "/sam2/segment_image"
            client.post(
                "/sam2/embed_image",
                encode({"image": {"type": "base64", "value": b64(first)}, "image_id": key}),
            )
        else:
            path = "/sam2/prompt_mask"
            client.post("/sam2/embed", encode({"image": b64(first)}))
        answer = client.post(path, encode(make(click(0), key=key)))
        points = iter(range(1, 10**6))
        http, alone = alternate(
            lambda: client.post(path, encode(make(click(next(points)), key=key))),
            lambda: model.clicks(1),
            ALTERNATIONS,
        )
        client.close()
        cpu = {}
        for c in (1, 4):
            spent = session_cpu(url)
            run = drive(url + path, [make(click(i), key=key) for i in range(4 * ALTERNATIONS)], c)
            cpu[c] = (session_cpu(url) - spent) / len(run.latencies)
        t0 = time.perf_counter()
        model.clicks(ALONE_CLICKS)
        alone_rate = ALONE_CLICKS / (time.perf_counter() - t0)
    data = json.loads(answer)
    if side == "peer":
        best = data["predictions"][0]
        score, rle = best["confidence"], best["masks"]
    else:
        score = float(decode_array(data["iou_predictions"], data["iou_shape"])[0])
        rle = data["masks"][0]
    return {
        "ready": ready,
        "bytes": len(answer),
        "score": score,
        "mask": decode_rle(rle),
        "http": http,
        "alone": alone,
        "four": run.throughput,
        "cpu1": cpu[1],
        "cpu4": cpu[4],
        "alone_rate": alone_rate,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="start-up, bytes per click, best score, HTTP vs model")
    ap.add_argument("--rounds", type=int, default=2, help="start-ups per server, in turns")
    ap.add_argument("--venvs", type=Path, default=CACHE / "venvs")
    ap.add_argument("--work", type=Path, default=CACHE / "work")
    ap.add_argument(
        "--four-ways", type=int, default=0, metavar="ROUNDS", help="only: 4 clicks in-process 3 ways"
    )
    args = ap.parse_args()
    venv, work = args.venvs / "roboflow", args.work / "roboflow"
    work.mkdir(parents=True, exist_ok=True)
    install(venv)
    prepare(venv, work)
    config = work / "visionserve.yaml"
    config.write_text(yaml.safe_dump(ours_config(work)))
    before = load_average()
    model = InProcess(work)
    if args.four_ways:
        rows = model.four_ways(args.four_ways)
        print(
            f"\n`{' '.join(['python -m bench.peer_roboflow', *sys.argv[1:]])}` on {cpu_name()}; 4 clicks "
            f"on one embedded image, medians of {args.four_ways} rounds; load average {before} before, "
            f"{load_average()} after.\n"
        )
        print(table(["4 clicks in-process", "wall ms per click", "CPU s per click"], rows))
        return
    library = model.best_score(click(0))
    runs: dict[str, list[dict]] = {"peer": [], "ours": []}
    for i in range(args.rounds):
        for side in ("peer", "ours") if i % 2 == 0 else ("ours", "peer"):
            runs[side].append(one_side(side, venv, work, config, model))
            print(side, {k: v for k, v in runs[side][-1].items() if k != "mask"}, flush=True)
    peer, ours = runs["peer"][0], runs["ours"][0]
    agree = float((peer["mask"] == ours["mask"]).mean())

    def cells(key: str, fmt) -> list[str]:
        return [fmt(statistics.median(v for r in runs[s] for v in np.atleast_1d(r[key]))) for s in runs]

    def ratio(side: str) -> str:
        http = statistics.median(v for r in runs[side] for v in r["http"])
        return f"{http / statistics.median(v for r in runs[side] for v in r['alone']):.3f}"

    rows = [
        ["start-up to ready, s", *cells("ready", lambda v: f"{v:.1f}")],
        ["bytes per click answer", *(f"{runs[s][0]['bytes']:,}" for s in runs)],
        ["best score, click at (150, 120)", f"{peer['score']:.8f}", f"{ours['score']:.8f}"],
        ["click over HTTP, c = 1, p50 ms", *cells("http", ms)],
        ["the same click in-process (SAM2ImagePredictor.predict), p50 ms", *cells("alone", ms)],
        ["HTTP / in-process, c = 1", ratio("peer"), ratio("ours")],
        ["clicks/s over HTTP, c = 4", *cells("four", lambda v: f"{v:.2f}")],
        ["clicks/s in-process right after, one at a time", *cells("alone_rate", lambda v: f"{v:.2f}")],
        ["server CPU seconds per click, c = 1", *cells("cpu1", lambda v: f"{v:.3f}")],
        ["server CPU seconds per click, c = 4", *cells("cpu4", lambda v: f"{v:.3f}")],
    ]
    print(
        f"\n`{' '.join(['python -m bench.peer_roboflow', *sys.argv[1:]])}` on {cpu_name()}; "
        f"{NAME} vs visionserve, one server at a time, {args.rounds} start-ups each in turns; per "
        f"start-up, {ALTERNATIONS} x 3 timed clicks over HTTP in turns with as many in this process; "
        f"medians over the start-ups; load average {before} before, {load_average()} after.\n"
    )
    print(table(["", NAME, "visionserve"], rows))
    print(
        f"\nSAM2ImagePredictor in this process, same checkpoint: best score {library:.8f}. The two "
        f"servers' masks for that click agree on {100 * agree:.4f} % of the pixels."
    )


if __name__ == "__main__":
    main()
