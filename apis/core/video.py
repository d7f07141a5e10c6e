"""Video clips in, per-frame tracking answers out: what every video family (SAM 2, SAM 3) shares.

Clips are decoded with OpenCV (its FFmpeg reads MP4, WebM and MOV) into RGB uint8 frames,
with limits checked while reading so an oversized clip is refused before it is held whole.
The tracked objects of one frame are rendered here too, so the serving layer turns a
:class:`FrameResult` into JSON without importing any model library.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from apis.core.encodings import coco_rle, png_base64
from apis.core.errors import APIError

MaskEncoding = Literal["coco_rle", "png", "polygons"]
MASK_ENCODINGS: tuple[str, ...] = ("coco_rle", "png", "polygons")


@dataclass
class TrackedObject:
    """One object on one frame."""

    obj_id: int
    mask: np.ndarray  # bool (H, W) at the video's size
    score: float  # sigmoid of the object-score logit (presence), in [0, 1]


@dataclass
class FrameResult:
    frame_index: int
    objects: list[TrackedObject]


# ----------------------------------------------------------------------------- decoding


def check_frame(frame: Any, size: tuple[int, int] | None, what: str) -> np.ndarray:
    """An RGB uint8 (H, W, 3) frame of the session's (height, width) ``size`` (any size for a
    session's first frame); 400 naming ``what`` otherwise. Both families' sessions use it."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise APIError(400, f"{what} must be an RGB uint8 (H, W, 3) image, got {frame.dtype} {frame.shape}")
    if size is not None and frame.shape[:2] != size:
        raise APIError(
            400,
            f"{what} is {frame.shape[1]}x{frame.shape[0]}; every frame of a session must be "
            f"{size[1]}x{size[0]} (width x height)",
            param="image",
        )
    return np.ascontiguousarray(frame)


def _frames(capture: cv2.VideoCapture, max_frames: int, max_pixels: int, param: str) -> list[np.ndarray]:
    """Every frame of an opened capture as RGB uint8, refusing more than ``max_frames`` frames
    or frames of more than ``max_pixels`` pixels as soon as one is read."""
    frames: list[np.ndarray] = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        h, w = bgr.shape[:2]
        if h * w > max_pixels:
            raise APIError(
                413,
                f"video frames are {w}x{h} = {h * w} pixels, more than the limit of {max_pixels}: "
                "send a smaller video",
                param=param,
                code="video_too_large",
            )
        if len(frames) == max_frames:
            total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            about = f" ({total} by its header)" if total > max_frames else ""
            raise APIError(
                413,
                f"the video has more than {max_frames} frames{about}, the limit: cut it shorter",
                param=param,
                code="video_too_long",
            )
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not frames:
        raise APIError(
            400,
            "the video could not be decoded (no frame read): send an MP4, WebM or MOV file",
            param=param,
            code="invalid_video",
        )
    return frames


def read_video_file(
    path: str | Path, max_frames: int, max_pixels: int, param: str = "video_path"
) -> list[np.ndarray]:
    """Frames (RGB uint8, HWC) of the video file at ``path``; APIError 400 if it cannot be read,
    413 over the limits."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise APIError(
                400,
                f"{Path(path).name} is not a readable video: send an MP4, WebM or MOV file",
                param=param,
                code="invalid_video",
            )
        return _frames(capture, max_frames, max_pixels, param)
    finally:
        capture.release()


def decode_video(data: bytes, max_frames: int, max_pixels: int, param: str = "video") -> list[np.ndarray]:
    """Frames (RGB uint8, HWC) of a clip's bytes. OpenCV reads files only, so the bytes go to a
    temporary file for the time of the decoding."""
    fd, name = tempfile.mkstemp(prefix="visionserve-video-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_video_file(name, max_frames, max_pixels, param)
    finally:
        os.unlink(name)


# ----------------------------------------------------------------------------- answers


def polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Outer outline of every region of the mask, ``[[x, y], ...]`` each (holes are not drawn)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).tolist() for c in contours]


def encode_mask(mask: np.ndarray, encoding: MaskEncoding) -> dict | list | str:
    """A bool (H, W) mask as COCO compressed RLE (``{"size", "counts"}``, what pycocotools
    decodes), a base64 PNG (0/255) or the outlines of its regions."""
    if encoding == "coco_rle":
        return coco_rle(mask)
    if encoding == "png":
        return png_base64(mask)
    if encoding == "polygons":
        return polygons(mask)
    raise APIError(400, f"mask_encoding must be one of {', '.join(MASK_ENCODINGS)}", param="mask_encoding")


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x, y, width, height] around the mask, counted in whole pixels as pycocotools'
    ``toBbox`` counts them (a one-pixel mask is 1 x 1); None when empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0]) + 1, int(rows[-1] - rows[0]) + 1]


def frame_answer(result: FrameResult, encoding: MaskEncoding = "coco_rle") -> dict[str, Any]:
    """One frame as the video routes answer it: ``{"frame_index", "objects": [{"obj_id",
    "score", "area", "bbox", "mask"}]}``."""
    return {
        "frame_index": result.frame_index,
        "objects": [
            {
                "obj_id": o.obj_id,
                "score": o.score,
                "area": int(o.mask.sum()),
                "bbox": mask_box(o.mask),
                "mask": encode_mask(o.mask, encoding),
            }
            for o in result.objects
        ],
    }
