"""SAM 2 client, seed 004 names: ``generate_sam2_auto_masks``, ``generate_sam2_prompt_masks``,
their ``*_decoded`` forms, the ``sam2_point_mask`` / ``sam2_box_mask`` / ``sam2_combined_mask``
shortcuts, mask decoding (every output mode, no pycocotools needed) and a PNG overlay writer.

``image`` is base64 text (as the seed sent) or anything :func:`encode_image` takes; the
``*_decoded`` helpers and shortcuts also take a file path. ``model_cfg`` / ``checkpoint_path``
only select among the server's models; None uses its default.

Embed once, prompt many: :func:`embed_sam2_image` answers the image's ``image_id`` (also
:func:`image_id` here, locally); pass ``image_id=`` to the prompt functions and the image is not
sent again. Pass the ``image`` too and it is re-sent by itself if the server evicted it.

Video: :class:`Sam2VideoSession` is one tracking session (a clip, or a live stream of frames)
on ``/sam2/video/sessions``; ``python -m clients.sam2_client track clip.mp4 --point 320,240
--out masks/`` tracks an object through a clip from the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pybase64

from .common import (
    VisionServeError,
    content_id,
    decode_array,
    encode_image,
    get,
    image_arg,
    image_file_bytes,
    post_arguments,
    send,
    server_settings,
)
from .masks import decode_png, decode_rle, save_overlay

__all__ = [
    "Sam2VideoSession",
    "VisionServeError",
    "decode_rle",
    "decode_segmentation",
    "embed_sam2_image",
    "encode_image",
    "encode_mask_input",
    "generate_sam2_auto_masks",
    "generate_sam2_auto_masks_decoded",
    "generate_sam2_prompt_masks",
    "generate_sam2_prompt_masks_decoded",
    "health",
    "image_id",
    "sam2_box_mask",
    "sam2_combined_mask",
    "sam2_point_mask",
    "save_mask_overlay",
    "unpack_bits",
]

FAMILY = "sam2"
PromptAnswer = tuple[np.ndarray, np.ndarray, np.ndarray]


def health(base_url: str | None = None, api_key: str | None = None) -> dict:
    return get(FAMILY, "health", base_url, api_key)


def image_id(image: Any) -> str:
    """The ``image_id`` the server gives ``image`` (a file path, bytes, PIL image or array; arrays
    and PIL images as the PNG this client sends), computed locally: the SHA-256 of its file."""
    return content_id(image_file_bytes(image))


def embed_sam2_image(
    image: Any = None,
    model_cfg: str | None = None,
    checkpoint_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """POST /sam2/embed: encode the image into the server's cache once. Answers ``image_id``,
    ``width``, ``height``, ``cached`` (already there) and ``model``. ``image`` may be a path."""
    image = image_arg(image)
    return post_arguments(FAMILY, "embed", locals(), image_key=True)


def generate_sam2_auto_masks(
    image: Any = None,
    preset: str = "fine_grained",
    points_per_side: int | None = None,
    points_per_batch: int | None = None,
    pred_iou_thresh: float | None = None,
    stability_score_thresh: float | None = None,
    stability_score_offset: float | None = None,
    mask_threshold: float | None = None,
    box_nms_thresh: float | None = None,
    crop_n_layers: int | None = None,
    crop_nms_thresh: float | None = None,
    crop_overlap_ratio: float | None = None,
    crop_n_points_downscale_factor: int | None = None,
    point_grids: Any = None,
    min_mask_region_area: float | None = None,
    use_m2m: bool | None = None,
    multimask_output: bool | None = None,
    output_mode: str = "binary_mask",
    mask_encoding: str = "float32",
    model_cfg: str | None = None,
    checkpoint_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
    image_id: str | None = None,
) -> dict:
    """POST /sam2/auto_mask; the JSON answer (``masks``, ``num_masks``, ``settings``, ...).

    Generator fields left None take the ``preset``'s values. ``image_id`` instead of the image:
    see the module's docstring.
    """
    if point_grids is not None:
        point_grids = [np.asarray(g, dtype=float).tolist() for g in point_grids]
    return post_arguments(FAMILY, "auto_mask", locals(), image_key=True)


def _as_list(value: Any) -> Any:
    """JSON-ready prompts: numpy arrays (or nested lists of them) become plain lists."""
    return None if value is None else np.asarray(value).tolist()


def encode_mask_input(mask: np.ndarray) -> tuple[str, list[int]]:
    """(base64, shape) of low-res logits for ``mask_input``; an (L, L) array becomes [1, L, L]."""
    arr = np.asarray(mask, dtype="<f4")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"mask_input must be (L, L) or (1, L, L) logits, got shape {arr.shape}")
    return pybase64.b64encode_as_string(np.ascontiguousarray(arr).tobytes()), list(arr.shape)


def generate_sam2_prompt_masks(
    image: Any = None,
    point_coords: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask_input: Any = None,
    mask_input_shape: list[int] | None = None,
    multimask_output: bool = True,
    return_logits: bool = False,
    normalize_coords: bool = True,
    mask_threshold: float = 0.0,
    max_hole_area: float = 0.0,
    max_sprinkle_area: float = 0.0,
    model_cfg: str | None = None,
    checkpoint_path: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    image_url: str | None = None,
    image_path: str | None = None,
    timeout: float = 600.0,
    mask_encoding: str = "float32",
    image_id: str | None = None,
) -> PromptAnswer:
    """POST /sam2/prompt_mask; (masks [C, H, W], iou_predictions [C], low_res_masks [C, L, L]).

    ``mask_input`` is a numpy array (e.g. ``low_res[i]`` of an earlier answer) or base64 text
    with ``mask_input_shape``. ``mask_encoding="packbits"`` makes the answer's masks 32x
    smaller on the wire; they decode to the same float32 0/1 array. ``image_id`` instead of
    the image: see the module's docstring.
    """
    if mask_input is not None and not isinstance(mask_input, str):
        mask_input, mask_input_shape = encode_mask_input(mask_input)
    point_coords, point_labels, box = _as_list(point_coords), _as_list(point_labels), _as_list(box)
    r = post_arguments(FAMILY, "prompt_mask", locals(), image_key=True)
    if r.get("mask_encoding") == "packbits":
        masks = unpack_bits(r["masks"], r["masks_shape"]).astype(np.float32)
    else:
        masks = decode_array(r["masks"], r["masks_shape"])
    return (
        masks,
        decode_array(r["iou_predictions"], r["iou_shape"]),
        decode_array(r["low_res_masks"], r["low_res_shape"]),
    )


# ----------------------------------------------------------------------------- decoding


def unpack_bits(data: str | bytes, shape: Sequence[int]) -> np.ndarray:
    """Bool array of ``shape`` from ``numpy.packbits`` bytes (or their base64) in C order."""
    raw = pybase64.b64decode(data) if isinstance(data, str) else data
    n = math.prod(shape)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"packbits data has {len(raw)} bytes, shape {list(shape)} needs {(n + 7) // 8}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).reshape(shape).astype(bool)


def decode_segmentation(mask: dict, encoding: str | None = None) -> np.ndarray:
    """(H, W) bool mask of one ``auto_mask`` entry, whatever its output mode.

    ``encoding`` is the answer's ``mask_encoding``; without it binary masks are recognised by
    their PNG signature or their length.
    """
    seg = mask["segmentation"]
    if isinstance(seg, np.ndarray):  # already decoded
        return seg.astype(bool, copy=False)
    if isinstance(seg, dict):
        return decode_rle(seg)
    h, w = (int(v) for v in mask["segmentation_shape"])
    raw = pybase64.b64decode(seg)
    if encoding is None:
        encoding = "png" if raw.startswith(b"\x89PNG") else "float32" if len(raw) == h * w * 4 else "packbits"
    if encoding == "float32":
        return decode_array(seg, [h, w]) > 0.5
    if encoding == "packbits":
        return unpack_bits(raw, (h, w))
    if encoding != "png":
        raise ValueError(f"unknown mask_encoding {encoding!r}")
    return decode_png(raw, (h, w))


def generate_sam2_auto_masks_decoded(image: Any = None, **kwargs) -> list[dict]:
    """Like :func:`generate_sam2_auto_masks` (``image`` may be a path) with each
    ``segmentation`` as an (H, W) bool array, whatever output mode and encoding were asked for."""
    r = generate_sam2_auto_masks(image_arg(image), **kwargs)
    encoding = r.get("mask_encoding")
    return [{**m, "segmentation": decode_segmentation(m, encoding)} for m in r["masks"]]


def generate_sam2_prompt_masks_decoded(image: Any = None, **kwargs) -> PromptAnswer:
    """Like :func:`generate_sam2_prompt_masks`, but ``image`` may also be a file path."""
    return generate_sam2_prompt_masks(image_arg(image), **kwargs)


def sam2_point_mask(
    image: Any = None, point_coords: Any = None, point_labels: Any = None, **kwargs
) -> PromptAnswer:
    """Masks from clicks: ``point_labels`` 1 keeps the point's object, 0 excludes it."""
    return generate_sam2_prompt_masks_decoded(
        image, point_coords=point_coords, point_labels=point_labels, **kwargs
    )


def sam2_box_mask(image: Any = None, box: Any = None, **kwargs) -> PromptAnswer:
    """Masks of the object inside ``box`` [x1, y1, x2, y2] (pixels)."""
    return generate_sam2_prompt_masks_decoded(image, box=box, **kwargs)


def sam2_combined_mask(
    image: Any = None, point_coords: Any = None, point_labels: Any = None, box: Any = None, **kwargs
) -> PromptAnswer:
    """Masks from a box refined by clicks, for objects a box alone leaves ambiguous."""
    return generate_sam2_prompt_masks_decoded(
        image, point_coords=point_coords, point_labels=point_labels, box=box, **kwargs
    )


def save_mask_overlay(image: Any, masks: Any, path: str | Path, alpha: float = 0.5, seed: int = 0) -> Path:
    """Write a PNG of ``image`` (path, PIL image or uint8 array) with each mask blended in its
    own colour, to check masks by eye; ``masks``: (H, W) bool or 0/1 arrays, an (N, H, W) array,
    or auto-mask dicts (decoded or not). Colours depend only on ``seed`` and the mask's index."""
    arrays = [decode_segmentation(m) if isinstance(m, dict) else m for m in masks]
    return save_overlay(image, arrays, path, alpha=alpha, seed=seed)


# ----------------------------------------------------------------------------- video sessions

_STREAM_ERRORS = {"session_lost": 410, "session_not_found": 404}


def _video_bytes(video: Any) -> bytes:
    return Path(video).read_bytes() if isinstance(video, (str, Path)) else bytes(video)


def decode_frame_masks(answer: dict, encoding: str) -> dict:
    """A frame answer with each object's ``mask`` as an (H, W) bool array (``coco_rle`` and
    ``png``); ``polygons`` stay outlines."""
    if encoding == "polygons":
        return answer
    decode = decode_rle if encoding == "coco_rle" else decode_png
    return {**answer, "objects": [{**o, "mask": decode(o["mask"])} for o in answer["objects"]]}


class Sam2VideoSession:
    """One SAM 2 tracking session on the server, opened on construction, deleted by
    :meth:`close` (or leaving a ``with`` block).

    Give a clip as ``video`` (a file path or the file's bytes: MP4, WebM, MOV), ``frames`` (a
    list of images) or ``video_path`` (a file on the server), or none of them for a live
    session that :meth:`add_frame` feeds. Answers are frames ``{"frame_index", "objects":
    [{"obj_id", "score", "area", "bbox", "mask"}]}`` with masks decoded to bool arrays unless
    ``decode=False`` or ``mask_encoding="polygons"``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        video: Any = None,
        frames: Sequence[Any] | None = None,
        video_path: str | None = None,
        *,
        api_key: str | None = None,
        model_cfg: str | None = None,
        max_frames: int | None = None,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        mask_encoding: str = "coco_rle",
        decode: bool = True,
        timeout: float = 600.0,
    ):
        self.base_url, self.api_key = server_settings(FAMILY, base_url, api_key)
        self.mask_encoding = mask_encoding
        self.decode = decode
        self.timeout = timeout
        self.last_totals: dict | None = None
        body = {
            "video": None if video is None else pybase64.b64encode_as_string(_video_bytes(video)),
            "frames": None if frames is None else [encode_image(f) for f in frames],
            "video_path": video_path,
            "model_cfg": model_cfg,
            "max_frames": max_frames,
            "offload_video_to_cpu": offload_video_to_cpu,
            "offload_state_to_cpu": offload_state_to_cpu,
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

    def prompt(
        self,
        frame_index: int,
        obj_id: int,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask: Any = None,
        clear_old_points: bool = True,
    ) -> dict:
        """Clicks (``labels`` 1 on the object, 0 background) and/or a box [x1, y1, x2, y2] in
        pixels, or a mask (bool array of the frame's size), for one object on one frame;
        answers that frame's objects."""
        body = {
            "frame_index": frame_index,
            "obj_id": obj_id,
            "points": _as_list(points),
            "labels": _as_list(labels),
            "box": _as_list(box),
            "mask": None if mask is None else encode_image((np.asarray(mask) > 0).astype(np.uint8) * 255),
            "clear_old_points": clear_old_points,
            "mask_encoding": self.mask_encoding,
        }
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

    def add_frame(self, image: Any) -> dict:
        """Live sessions: append one image (path, bytes, PIL image or array) and get its
        objects, tracked at once."""
        body = {"image": encode_image(image), "mask_encoding": self.mask_encoding}
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

    def __enter__(self) -> Sam2VideoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- command line


def _pair(text: str, n: int) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return values


def _overlay_video(clip: Path, masks: dict[int, list[np.ndarray]], out: Path, alpha: float = 0.5) -> None:
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


def track(args: argparse.Namespace) -> int:
    """The ``track`` command: one object through a clip, masks written as they arrive."""
    from PIL import Image
    from tqdm import tqdm

    points = [*args.point, *args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    if not points and args.box is None:
        raise SystemExit("give at least one --point (or --negative) or a --box")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rles: dict[str, Any] = {}
    overlay: dict[int, list[np.ndarray]] = {}
    with Sam2VideoSession(args.base_url, video=args.clip, api_key=args.api_key, decode=False) as session:
        session.prompt(args.frame, args.obj_id, points=points or None, labels=labels or None, box=args.box)
        with tqdm(total=session.num_frames, unit="frame", desc="tracking") as bar:
            for frame in session.propagate(args.direction):
                masks = [decode_rle(o["mask"]) for o in frame["objects"]]
                if args.overlay:
                    overlay[frame["frame_index"]] = masks
                if args.format == "rle":
                    rles[str(frame["frame_index"])] = frame["objects"]
                else:
                    for o, mask in zip(frame["objects"], masks, strict=True):
                        name = f"{frame['frame_index']:05d}_obj{o['obj_id']}.png"
                        Image.fromarray(mask.astype(np.uint8) * 255).save(out / name)
                bar.update()
        totals = session.last_totals or {}
    if args.format == "rle":
        (out / "masks.json").write_text(json.dumps({"encoding": "coco_rle", "frames": rles}))
    if args.overlay:
        _overlay_video(Path(args.clip), overlay, Path(args.overlay))
    fps = totals.get("frames_per_s")
    print(
        f"{totals.get('frames', 0)} frames tracked"
        + (f" at {fps} frames/s" if fps else "")
        + f", written to {out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clients.sam2_client", description="SAM 2 from the command line."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("track", help="track an object through a video clip")
    t.add_argument("clip", help="video file (MP4, WebM, MOV)")
    t.add_argument(
        "--point", action="append", default=[], type=lambda v: _pair(v, 2), help="x,y on the object"
    )
    t.add_argument("--negative", action="append", default=[], type=lambda v: _pair(v, 2), help="x,y off it")
    t.add_argument("--box", type=lambda v: _pair(v, 4), help="x1,y1,x2,y2 around it")
    t.add_argument("--frame", type=int, default=0, help="the frame the prompt is on")
    t.add_argument("--obj-id", type=int, default=1)
    t.add_argument("--direction", choices=["forward", "backward", "both"], default="both")
    t.add_argument("--out", required=True, help="folder for the masks")
    t.add_argument(
        "--format", choices=["png", "rle"], default="png", help="PNG per frame and object, or masks.json"
    )
    t.add_argument("--overlay", help="also write the clip with the masks drawn, as this MP4 (needs OpenCV)")
    t.add_argument("--base-url", default=None, help="default: servers.yaml sam2.base_url")
    t.add_argument("--api-key", default=None, help="default: servers.yaml or $VISIONSERVE_API_KEY")
    args = parser.parse_args(argv)
    return track(args)


if __name__ == "__main__":
    sys.exit(main())
