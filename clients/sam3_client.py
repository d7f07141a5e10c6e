"""SAM 3 client, seed 000 names: ``Sam3ServiceClient(base_url).predict(...)`` and
``Sam3ServicePool([...urls]).predict(...)``, plus mask decoding and an overlay writer.

``base_url`` is the family's prefix (``http://host:8000/sam3``); the seed's own servers
(``http://host:8001``) answer the same routes. ``api_key`` is optional: seed servers and a
server started with ``--no-auth`` need none.

Embed once, prompt many: :meth:`Sam3ServiceClient.embed` answers the image's ``image_id``;
``predict(image_id=...)`` then sends only the id, and re-sends the ``image`` by itself (if given
too) when the server evicted it.

Video: :class:`Sam3VideoSession` segments and tracks every instance of a concept (a text,
exemplar boxes) through a clip or a live stream on ``/sam3/video/sessions``; ``python -m
clients.sam3_client track clip.mp4 --text "robot arm" --out out.json`` does it from the command
line.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import requests

from .common import VisionServeError, get, image_fields, post_image, server_settings
from .masks import decode_png, decode_rle, save_overlay
from .video import VideoSession, overlay_video, track_frames, tracked_line

__all__ = [
    "NoLiveEndpointError",
    "Sam3ServiceClient",
    "Sam3ServicePool",
    "Sam3VideoSession",
    "VisionServeError",
    "decode_instance_mask",
    "decode_instance_masks",
    "save_instances_overlay",
]

FAMILY = "sam3"


class Sam3ServiceClient:
    """One SAM 3 server. Blocking; safe to share between threads (one HTTP session per thread)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        self.base_url, self.api_key = server_settings(FAMILY, base_url, api_key)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Sam3ServiceClient({self.base_url!r})"

    def health(self, timeout: float = 5.0) -> dict:
        """``GET /health``: ``{"status": "ok", ...}`` when the server's SAM 3 workers are ready."""
        return get(FAMILY, "health", self.base_url, self.api_key, timeout)

    def predict(
        self,
        image_path: str | None = None,
        prompts: Sequence[str] = (),
        return_masks: bool = False,
        mask_format: str = "rle",
        score_threshold: float | None = None,
        epsilon_factor: float | None = None,
        min_area: float | None = None,
        *,
        image: Any = None,
        image_url: str | None = None,
        model: str | None = None,
        image_id: str | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
        box_labels: Sequence[int] | None = None,
        max_instances: int | None = None,
    ) -> dict:
        """Instances of each text prompt: ``{"image_size": {...}, "results": [...]}``.

        The image is one of ``image_path`` (a file on the server, inside its allowed roots),
        ``image`` (base64 text, a local file path as ``Path``, bytes, PIL image or uint8 array)
        or ``image_url``; or ``image_id`` (from :meth:`embed`), with or without one of those to
        fall back on. Thresholds left None take the server's defaults. ``boxes`` are exemplar
        boxes ``[x1, y1, x2, y2]`` in pixels, combined with every prompt or, with no prompts, the
        query on their own; ``box_labels`` gives 1 (positive) or 0 (negative) per box, default all 1.
        ``max_instances`` keeps the best few per prompt (1: the best object only).
        """
        payload = {
            "prompts": list(prompts) if prompts or boxes is None else None,
            "boxes": [[float(v) for v in box] for box in boxes] if boxes is not None else None,
            "box_labels": [int(v) for v in box_labels] if box_labels is not None else None,
            "return_masks": return_masks,
            "mask_format": mask_format,
            "score_threshold": score_threshold,
            "epsilon_factor": epsilon_factor,
            "min_area": min_area,
            "max_instances": max_instances,
            "model": model,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        fields = image_fields(image, image_url, image_path)
        return post_image(
            FAMILY, "predict", payload, fields, image_id, self.base_url, self.api_key, self.timeout
        )

    def embed(
        self,
        image_path: str | None = None,
        *,
        image: Any = None,
        image_url: str | None = None,
        model: str | None = None,
    ) -> dict:
        """Encode the image into the server's cache once: ``{"image_id", "width", "height",
        "cached", "model"}``. Then ``predict(image_id=...)`` skips sending and encoding it."""
        payload = {} if model is None else {"model": model}
        fields = image_fields(image, image_url, image_path)
        return post_image(FAMILY, "embed", payload, fields, None, self.base_url, self.api_key, self.timeout)


class NoLiveEndpointError(RuntimeError):
    """Every endpoint of a :class:`Sam3ServicePool` failed; ``errors`` maps each URL to why."""

    def __init__(self, errors: dict[str, str]):
        lines = "; ".join(f"{url}: {why}" for url, why in errors.items())
        super().__init__(f"no live SAM 3 endpoint among {len(errors)}: {lines}")
        self.errors = errors


def _retryable(exc: Exception) -> bool:
    """Failures of the endpoint, not of the request: the next endpoint may succeed."""
    if isinstance(exc, VisionServeError):
        return exc.status >= 500
    return isinstance(exc, requests.RequestException)


class Sam3ServicePool:
    """Round-robin over several SAM 3 servers; blocking and thread-safe.

    Each call starts at the next endpoint in turn. An endpoint that fails (connection refused or
    reset, timeout, 5xx) is marked dead and the call moves on to the next live one; a 4xx answer
    is the request's fault and is raised at once. Dead endpoints are skipped until
    ``recheck_after`` seconds have passed, then tried again only if ``GET /health`` says ok.
    When no endpoint can answer, :class:`NoLiveEndpointError` says what each one did.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        api_key: str | None = None,
        timeout: float = 600.0,
        recheck_after: float = 10.0,
    ):
        if not base_urls:
            raise ValueError("Sam3ServicePool needs at least one base URL")
        self.clients = [Sam3ServiceClient(u, api_key, timeout) for u in base_urls]
        self.recheck_after = recheck_after
        self._lock = threading.Lock()
        self._next = 0
        self._dead_since: dict[int, float] = {}

    def __repr__(self) -> str:
        return f"Sam3ServicePool({[c.base_url for c in self.clients]!r})"

    def live(self) -> list[str]:
        """Base URLs whose ``/health`` answers ok now (and forget earlier failures of those)."""
        up = []
        for i, client in enumerate(self.clients):
            if self._healthy(client):
                with self._lock:
                    self._dead_since.pop(i, None)
                up.append(client.base_url)
        return up

    @staticmethod
    def _healthy(client: Sam3ServiceClient) -> bool:
        try:
            return client.health(timeout=2.0).get("status") == "ok"
        except (VisionServeError, requests.RequestException, ValueError):
            return False

    def _turn(self) -> list[int]:
        """Endpoints to try for one call, in round-robin order, dead ones left out. A dead
        endpoint whose ``recheck_after`` has passed rejoins if its ``/health`` answers ok."""
        with self._lock:
            n = len(self.clients)
            start, self._next = self._next, (self._next + 1) % n
            order = [(start + k) % n for k in range(n)]
            now = time.monotonic()
            due = [i for i, t in self._dead_since.items() if now - t >= self.recheck_after]
        for i in due:
            self._mark(i, dead=not self._healthy(self.clients[i]))
        with self._lock:
            return [i for i in order if i not in self._dead_since]

    def _mark(self, i: int, dead: bool) -> None:
        with self._lock:
            if dead:
                self._dead_since[i] = time.monotonic()
            else:
                self._dead_since.pop(i, None)

    def predict(self, *args, **kwargs) -> dict:
        """:meth:`Sam3ServiceClient.predict` on the next live endpoint (same arguments)."""
        candidates = self._turn()
        if not candidates:  # every endpoint failed recently: look again before giving up
            self.live()
            candidates = self._turn()
        errors: dict[str, str] = {}
        for i in candidates:
            client = self.clients[i]
            try:
                result = client.predict(*args, **kwargs)
            except Exception as exc:
                if not _retryable(exc):
                    raise
                errors[client.base_url] = f"{type(exc).__name__}: {exc}"
                self._mark(i, dead=True)
                continue
            self._mark(i, dead=False)
            return result
        for client in self.clients:
            errors.setdefault(client.base_url, "marked dead and /health does not answer ok")
        raise NoLiveEndpointError(errors)


def decode_instance_mask(instance: dict) -> np.ndarray:
    """(H, W) bool mask of one result that carries a ``mask`` (``return_masks=True``)."""
    mask = instance.get("mask")
    if mask is None:
        raise ValueError("this instance has no mask: ask predict(..., return_masks=True)")
    if mask["format"] == "rle":
        data = mask["data"]
        return decode_rle(data if isinstance(data, dict) else {"size": mask["shape"], "counts": data})
    if mask["format"] == "png":
        return decode_png(mask["data"], mask["shape"])
    raise ValueError(f"unknown mask format {mask['format']!r}")


def decode_instance_masks(response: dict) -> np.ndarray:
    """(N, H, W) bool masks of every result of a ``predict`` answer, in result order."""
    size = response["image_size"]
    masks = [decode_instance_mask(r) for r in response["results"]]
    return np.stack(masks) if masks else np.zeros((0, size["height"], size["width"]), dtype=bool)


def save_instances_overlay(
    image: Any, response: dict, path: str | Path, alpha: float = 0.5, seed: int = 0
) -> Path:
    """Write a PNG of ``image`` with each result's mask (when returned) blended in and its
    polygon outlined, one colour per instance."""
    results = response["results"]
    masks = [decode_instance_mask(r) for r in results if r.get("mask") is not None]
    return save_overlay(image, masks, path, polygons=[r["polygon"] for r in results], alpha=alpha, seed=seed)


# ----------------------------------------------------------------------------- video sessions


class Sam3VideoSession(VideoSession):
    """One SAM 3 tracking session on the server, opened on construction, deleted by
    :meth:`close` (or leaving a ``with`` block); the clip arguments are
    :class:`~clients.video.VideoSession`'s. A session tracks one concept: :meth:`prompt` with a
    text or boxes starts it over. Frames answer ``{"frame_index", "objects": [{"obj_id",
    "score", "area", "bbox", "polygon", "mask"}]}``, instances appearing and disappearing."""

    family = FAMILY

    def __init__(
        self,
        base_url: str | None = None,
        video: Any = None,
        frames: Sequence[Any] | None = None,
        video_path: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        max_frames: int | None = None,
        offload_video_to_cpu: bool = False,
        mask_encoding: str = "coco_rle",
        decode: bool = True,
        timeout: float = 600.0,
    ):
        super().__init__(
            base_url,
            video,
            frames,
            video_path,
            api_key=api_key,
            selector={"model": model},
            max_frames=max_frames,
            offload={"offload_video_to_cpu": offload_video_to_cpu},
            mask_encoding=mask_encoding,
            decode=decode,
            timeout=timeout,
        )

    def prompt(
        self,
        frame_index: int,
        text: str | None = None,
        boxes: Any = None,
        box_labels: Any = None,
        points: Any = None,
        point_labels: Any = None,
        obj_id: int | None = None,
    ) -> dict:
        """A concept on one frame: ``text``, exemplar ``boxes`` [[x1, y1, x2, y2], ...] in pixels
        (``box_labels`` 1 like, 0 unlike), or both; or ``points`` (``point_labels`` 1 on, 0 off)
        refining or adding instance ``obj_id`` on a frame that has outputs. Answers the frame."""
        return self._prompt(
            {
                "frame_index": frame_index,
                "text": text,
                "boxes": None if boxes is None else np.asarray(boxes, dtype=float).tolist(),
                "box_labels": None if box_labels is None else [int(v) for v in box_labels],
                "points": None if points is None else np.asarray(points, dtype=float).tolist(),
                "point_labels": None if point_labels is None else [int(v) for v in point_labels],
                "obj_id": obj_id,
            }
        )

    def __enter__(self) -> Sam3VideoSession:
        return self


def track(args: argparse.Namespace) -> int:
    """The ``track`` command: every instance of a concept through a clip, into one JSON of
    COCO-RLE masks per frame with instance ids."""
    if args.text is None and not args.box:
        raise SystemExit("give a --text, a --box, or both")
    frames: dict[str, list[dict]] = {}
    overlay: dict[int, list[np.ndarray]] = {}

    def each(frame: dict, masks: list[np.ndarray]) -> None:
        frames[str(frame["frame_index"])] = frame["objects"]
        if args.overlay:
            overlay[frame["frame_index"]] = masks

    with Sam3VideoSession(args.base_url, video=args.clip, api_key=args.api_key, decode=False) as session:
        session.prompt(args.frame, text=args.text, boxes=args.box or None)
        totals = track_frames(session, args.direction, each)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"encoding": "coco_rle", "text": args.text, "boxes": args.box or None, "frames": frames}
    out.write_text(json.dumps(body))
    if args.overlay:
        overlay_video(Path(args.clip), overlay, Path(args.overlay))
    print(tracked_line(totals, out))
    return 0


# ----------------------------------------------------------------------------- folder command


def _instance_record(instance: dict) -> dict:
    """One ``predict`` instance (asked with RLE masks) as a COCO annotation's fields."""
    mask = instance["mask"]
    rle = mask["data"] if isinstance(mask["data"], dict) else {"size": mask["shape"], "counts": mask["data"]}
    x1, y1, x2, y2 = instance["bbox"]
    return {
        "category": instance["prompt"],
        "segmentation": rle,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": instance["area"],
        "score": instance["score"],
    }


def label_folder(argv: list[str] | None = None) -> int:
    """``label DIR --prompts "mug,robot arm" --coco out.json``: every image's instances of each
    prompt, as a COCO instances file (one category per prompt, RLE masks, scores)."""
    from .folders import add_common_arguments, label_command

    parser = argparse.ArgumentParser(
        prog="python -m clients.sam3_client label", description=label_folder.__doc__.split(":", 1)[1]
    )
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--prompts", required=True, help="comma-separated text prompts, one category each")
    parser.add_argument("--coco", required=True, help="the COCO instances file to write")
    parser.add_argument("--score-threshold", type=float, default=None, help="default: the server's")
    parser.add_argument("--min-area", type=float, default=None, help="default: the server's")
    parser.add_argument("--model", default=None, help="default: the server's default SAM 3 model")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    prompts = list(dict.fromkeys(p.strip() for p in args.prompts.split(",") if p.strip()))
    if not prompts:
        parser.error("--prompts needs at least one prompt")
    client = Sam3ServiceClient(args.base_url, args.api_key)

    def label_one(file: Path) -> dict:
        r = client.predict(
            prompts=prompts,
            return_masks=True,
            mask_format="rle",
            score_threshold=args.score_threshold,
            min_area=args.min_area,
            image=file,
            model=args.model,
        )
        size = r["image_size"]
        instances = [_instance_record(i) for i in r["results"]]
        return {"width": size["width"], "height": size["height"], "instances": instances}

    return label_command(args, prompts, label_one)


def _box(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected x1,y1,x2,y2, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["label"]:  # a folder command, with its own arguments
        return label_folder(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m clients.sam3_client", description="SAM 3 from the command line."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("label", help="instances of prompts in a folder of images as a COCO file (label -h)")
    t = commands.add_parser("track", help="segment and track every instance of a concept through a clip")
    t.add_argument("clip", help="video file (MP4, WebM, MOV)")
    t.add_argument("--text", help='the concept, a noun phrase ("robot arm")')
    t.add_argument("--box", action="append", default=[], type=_box, help="x1,y1,x2,y2: an exemplar")
    t.add_argument("--frame", type=int, default=0, help="the frame the prompt is on")
    t.add_argument("--direction", choices=["forward", "backward", "both"], default="forward")
    t.add_argument("--out", required=True, help="the JSON file: COCO-RLE masks per frame with instance ids")
    t.add_argument("--overlay", help="also write the clip with the masks drawn, as this MP4 (needs OpenCV)")
    t.add_argument("--base-url", default=None, help="default: servers.yaml sam3.base_url")
    t.add_argument("--api-key", default=None, help="default: servers.yaml or $VISIONSERVE_API_KEY")
    return track(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
