"""What the SAM 2 and SAM 3 video clients share: one tracking session on
``<family>/video/sessions`` (opened on construction, deleted by ``close``), the NDJSON stream of
``propagate``, mask decoding of frame answers, and the ``track`` command's progress bar and
overlay MP4. Each family's client adds its own ``prompt``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pybase64

from .common import VisionServeError, encode_image, send, server_settings
from .masks import decode_png, decode_rle

_STREAM_ERRORS = {"session_lost": 410, "session_not_found": 404}


def video_bytes(video: Any) -> bytes:
    return Path(video).read_bytes() if isinstance(video, (str, Path)) else bytes(video)


def decode_frame_masks(answer: dict, encoding: str) -> dict:
    """A frame answer with each object's ``mask`` as an (H, W) bool array (``coco_rle`` and
    ``png``); ``polygons`` stay outlines."""
    if encoding == "polygons":
        return answer
    decode = decode_rle if encoding == "coco_rle" else decode_png
    return {**answer, "objects": [{**o, "mask": decode(o["mask"])} for o in answer["objects"]]}


class VideoSession:
    """One tracking session of ``family`` on the server (see the family's subclass). Give a clip
    as ``video`` (a file path or the file's bytes: MP4, WebM, MOV), ``frames`` (a list of images)
    or ``video_path`` (a file on the server), or none of them for a live session that
    :meth:`add_frame` feeds. ``selector``: the family's model fields. Answers are frames
    ``{"frame_index", "objects": [...]}`` with masks decoded to bool arrays unless
    ``decode=False`` or ``mask_encoding="polygons"``."""

    family: str

    def __init__(
        self,
        base_url: str | None,
        video: Any,
        frames: Sequence[Any] | None,
        video_path: str | None,
        *,
        api_key: str | None,
        selector: dict[str, Any],
        max_frames: int | None,
        offload: dict[str, bool],
        mask_encoding: str,
        decode: bool,
        timeout: float,
    ):
        self.base_url, self.api_key = server_settings(self.family, base_url, api_key)
        self.mask_encoding = mask_encoding
        self.decode = decode
        self.timeout = timeout
        self.last_totals: dict | None = None
        body = {
            "video": None if video is None else pybase64.b64encode_as_string(video_bytes(video)),
            "frames": None if frames is None else [encode_image(f) for f in frames],
            "video_path": video_path,
            **selector,
            "max_frames": max_frames,
            **offload,
        }
        created = self._call("POST", "video/sessions", {k: v for k, v in body.items() if v is not None})
        self.session_id: str | None = created["session_id"]
        self.created = created
        self.url = f"{self.base_url}/video/sessions/{self.session_id}"

    @property
    def num_frames(self) -> int:
        return self.created["num_frames"]

    def _call(self, method: str, path: str, payload: dict | None = None, **kwargs: Any) -> Any:
        resp = send(method, f"{self.base_url}/{path}", self.api_key, self.timeout, json=payload, **kwargs)
        return resp if kwargs.get("stream") else (resp.json() if resp.content else None)

    def _path(self, route: str = "") -> str:
        if self.session_id is None:
            raise VisionServeError(404, "this session is closed", "session_not_found")
        return f"video/sessions/{self.session_id}" + (f"/{route}" if route else "")

    def _frame(self, answer: dict) -> dict:
        return decode_frame_masks(answer, self.mask_encoding) if self.decode else answer

    def _prompt(self, body: dict) -> dict:
        """POST .../prompts with the fields that are set; answers the prompted frame."""
        body = {**body, "mask_encoding": self.mask_encoding}
        return self._frame(
            self._call("POST", self._path("prompts"), {k: v for k, v in body.items() if v is not None})
        )

    def propagate(
        self, direction: str = "forward", start_frame_index: int | None = None, max_frames: int | None = None
    ) -> Iterator[dict]:
        """Frames as the server computes them (one NDJSON line each). Stopping early (``break``,
        closing the iterator) disconnects, and the server stops within a frame. The totals line
        is kept in :attr:`last_totals`."""
        body = {"direction": direction, "start_frame_index": start_frame_index, "max_frames": max_frames}
        body["mask_encoding"] = self.mask_encoding
        resp = self._call("POST", self._path("propagate"), body, stream=True)
        self.last_totals = None
        with resp:
            for line in resp.iter_lines():
                if not line:
                    continue
                part = json.loads(line)
                if "error" in part:
                    err = part["error"]
                    code = err.get("code")
                    raise VisionServeError(
                        _STREAM_ERRORS.get(code, 500), err.get("message", ""), code, body=part
                    )
                if part.get("done"):
                    self.last_totals = part
                    return
                yield self._frame(part)

    def add_frame(
        self, image: Any = None, *, image_url: str | None = None, image_path: str | None = None
    ) -> dict:
        """Live sessions: append one image (path, bytes, PIL image or array; or a URL or a file
        on the server, as on the image routes) and get its objects, tracked at once."""
        body = {
            "image": None if image is None else encode_image(image),
            "image_url": image_url,
            "image_path": image_path,
            "mask_encoding": self.mask_encoding,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return self._frame(self._call("POST", self._path("frames"), body))

    def info(self) -> dict:
        """Frames, objects, memory and idle time of the session."""
        return self._call("GET", self._path())

    def close(self) -> None:
        """Delete the session on the server (once; a session already gone is not an error)."""
        if self.session_id is None:
            return
        try:
            self._call("DELETE", self._path())
        except VisionServeError as e:
            if e.status not in (404, 410):
                raise
        self.session_id = None

    def __enter__(self) -> VideoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- the track command


def overlay_video(clip: Path, masks: dict[int, list[np.ndarray]], out: Path, alpha: float = 0.5) -> None:
    """The clip with each object's mask blended in its own colour, as an MP4 (needs OpenCV)."""
    try:
        import cv2
    except ImportError:
        raise SystemExit("--overlay needs OpenCV: pip install opencv-python-headless") from None
    colours = np.random.default_rng(0).integers(60, 255, (64, 3))
    capture = cv2.VideoCapture(str(clip))
    fps = capture.get(cv2.CAP_PROP_FPS) or 10.0
    writer = None
    index = 0
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            if writer is None:
                h, w = bgr.shape[:2]
                writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            frame = bgr.astype(np.float32)
            for k, mask in enumerate(masks.get(index, [])):
                frame[mask] = (1 - alpha) * frame[mask] + alpha * colours[k % len(colours)][::-1]
            writer.write(frame.astype(np.uint8))
            index += 1
    finally:
        capture.release()
        if writer is not None:
            writer.release()


def track_frames(
    session: VideoSession, direction: str, each: Callable[[dict, list[np.ndarray]], None]
) -> dict:
    """Propagate with a progress bar, calling ``each(frame, masks)`` as frames arrive (the
    session's answers undecoded, COCO RLE, and their masks); answers the totals line."""
    from tqdm import tqdm

    with tqdm(total=session.num_frames, unit="frame", desc="tracking") as bar:
        for frame in session.propagate(direction):
            each(frame, [decode_rle(o["mask"]) for o in frame["objects"]])
            bar.update()
    return session.last_totals or {}


def tracked_line(totals: dict, out: Path) -> str:
    fps = totals.get("frames_per_s")
    return (
        f"{totals.get('frames', 0)} frames tracked"
        + (f" at {fps} frames/s" if fps else "")
        + f", written to {out}"
    )
