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
from collections.abc import Sequence
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
)
from .masks import decode_png, decode_rle, save_overlay
from .video import VideoSession, overlay_video, track_frames, tracked_line

__all__ = [
    "Sam2VideoSession",
    "VisionServeError",
    "decode_prompt_answer",
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
PromptAnswer = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # low_res_masks None when not asked for


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
    best_only: bool = False,
    return_low_res_masks: bool = True,
    low_res_dtype: str = "float32",
) -> PromptAnswer:
    """POST /sam2/prompt_mask; (masks [C, H, W], iou_predictions [C], low_res_masks [C, L, L]).

    ``mask_input`` is a numpy array (e.g. ``low_res[i]`` of an earlier answer) or base64 text
    with ``mask_input_shape``. ``mask_encoding="packbits"`` (32x smaller) or ``"coco_rle"``
    (smaller still for one object) shrink the answer's masks on the wire; they decode to the
    same float32 0/1 array. For clicks: ``best_only=True`` answers the one mask of highest
    predicted IoU, ``return_low_res_masks=False`` leaves the logits out (low_res_masks is then
    None), ``low_res_dtype="float16"`` halves them (decoded to float32). ``image_id`` instead of
    the image: see the module's docstring.
    """
    if mask_input is not None and not isinstance(mask_input, str):
        mask_input, mask_input_shape = encode_mask_input(mask_input)
    point_coords, point_labels, box = _as_list(point_coords), _as_list(point_labels), _as_list(box)
    r = post_arguments(FAMILY, "prompt_mask", locals(), image_key=True)
    return decode_prompt_answer(r)


def decode_prompt_answer(r: dict) -> PromptAnswer:
    """(masks [C, H, W] float32, iou_predictions [C], low_res_masks [C, L, L] float32 or None)
    of a prompt_mask answer, in whichever mask_encoding and low_res_dtype it came."""
    encoding = r.get("mask_encoding")
    if encoding == "packbits":
        masks = unpack_bits(r["masks"], r["masks_shape"]).astype(np.float32)
    elif encoding == "coco_rle":
        masks = np.zeros(r["masks_shape"], dtype=np.float32)
        for out, rle in zip(masks, r["masks"], strict=True):
            out[decode_rle(rle)] = 1.0
    else:
        masks = decode_array(r["masks"], r["masks_shape"])
    low = None
    if r.get("low_res_masks") is not None:
        low = decode_array(r["low_res_masks"], r["low_res_shape"], r.get("low_res_dtype", "float32"))
    return (
        masks,
        decode_array(r["iou_predictions"], r["iou_shape"]),
        None if low is None else low.astype(np.float32),
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


class Sam2VideoSession(VideoSession):
    """One SAM 2 tracking session on the server, opened on construction, deleted by
    :meth:`close` (or leaving a ``with`` block).

    Give a clip as ``video`` (a file path or the file's bytes: MP4, WebM, MOV), ``frames`` (a
    list of images) or ``video_path`` (a file on the server), or none of them for a live
    session that :meth:`add_frame` feeds. Answers are frames ``{"frame_index", "objects":
    [{"obj_id", "score", "area", "bbox", "mask"}]}`` with masks decoded to bool arrays unless
    ``decode=False`` or ``mask_encoding="polygons"``.
    """

    family = FAMILY

    def __init__(
        self,
        base_url: str | None = None,
        video: Any = None,
        frames: Sequence[Any] | None = None,
        video_path: str | None = None,
        *,
        api_key: str | None = None,
        model_cfg: str | None = None,
        checkpoint_path: str | None = None,
        max_frames: int | None = None,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
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
            selector={"model_cfg": model_cfg, "checkpoint_path": checkpoint_path},
            max_frames=max_frames,
            offload={
                "offload_video_to_cpu": offload_video_to_cpu,
                "offload_state_to_cpu": offload_state_to_cpu,
            },
            mask_encoding=mask_encoding,
            decode=decode,
            timeout=timeout,
        )

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
        return self._prompt(
            {
                "frame_index": frame_index,
                "obj_id": obj_id,
                "points": _as_list(points),
                "labels": _as_list(labels),
                "box": _as_list(box),
                "mask": None if mask is None else encode_image((np.asarray(mask) > 0).astype(np.uint8) * 255),
                "clear_old_points": clear_old_points,
            }
        )

    def __enter__(self) -> Sam2VideoSession:
        return self


# ----------------------------------------------------------------------------- command line


def _pair(text: str, n: int) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return values


def track(args: argparse.Namespace) -> int:
    """The ``track`` command: one object through a clip, masks written as they arrive."""
    from PIL import Image

    points = [*args.point, *args.negative]
    labels = [1] * len(args.point) + [0] * len(args.negative)
    if not points and args.box is None:
        raise SystemExit("give at least one --point (or --negative) or a --box")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rles: dict[str, Any] = {}
    overlay: dict[int, list[np.ndarray]] = {}

    def each(frame: dict, masks: list[np.ndarray]) -> None:
        if args.overlay:
            overlay[frame["frame_index"]] = masks
        if args.format == "rle":
            rles[str(frame["frame_index"])] = frame["objects"]
        else:
            for o, mask in zip(frame["objects"], masks, strict=True):
                name = f"{frame['frame_index']:05d}_obj{o['obj_id']}.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / name)

    with Sam2VideoSession(args.base_url, video=args.clip, api_key=args.api_key, decode=False) as session:
        session.prompt(args.frame, args.obj_id, points=points or None, labels=labels or None, box=args.box)
        totals = track_frames(session, args.direction, each)
    if args.format == "rle":
        (out / "masks.json").write_text(json.dumps({"encoding": "coco_rle", "frames": rles}))
    if args.overlay:
        overlay_video(Path(args.clip), overlay, Path(args.overlay))
    print(tracked_line(totals, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["automask"]:  # a folder command, with its own arguments
        return automask_folder(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m clients.sam2_client", description="SAM 2 from the command line."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("automask", help="automatic masks of a folder of images as a COCO file (automask -h)")
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


# ----------------------------------------------------------------------------- folder command


def automask_folder(argv: list[str] | None = None) -> int:
    """``automask DIR --coco out.json``: every image's automatic masks as a COCO instances file
    (one category, ``object``; RLE masks; the score is the predicted IoU)."""
    from .folders import add_common_arguments, label_command

    parser = argparse.ArgumentParser(
        prog="python -m clients.sam2_client automask", description=automask_folder.__doc__.split(":", 1)[1]
    )
    parser.add_argument("folder", help="folder of images (searched recursively)")
    parser.add_argument("--coco", required=True, help="the COCO instances file to write")
    parser.add_argument("--preset", default="fine_grained", help="the generator preset (README: SAM 2)")
    parser.add_argument("--points-per-side", type=int, default=None, help="default: the preset's")
    parser.add_argument("--pred-iou-thresh", type=float, default=None, help="default: the preset's")
    parser.add_argument("--stability-score-thresh", type=float, default=None, help="default: the preset's")
    parser.add_argument("--model-cfg", default=None, help="default: the server's default SAM 2 model")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    def label_one(file: Path) -> dict:
        r = generate_sam2_auto_masks(
            image=file,
            preset=args.preset,
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            output_mode="coco_rle",
            model_cfg=args.model_cfg,
            base_url=args.base_url,
            api_key=args.api_key,
        )
        h, w = r["image_size"]
        instances = [
            {
                "category": "object",
                "segmentation": m["segmentation"],
                "bbox": m["bbox"],
                "area": m["area"],
                "score": m["predicted_iou"],
            }
            for m in r["masks"]
        ]
        return {"width": w, "height": h, "instances": instances}

    return label_command(args, ["object"], label_one)


if __name__ == "__main__":
    sys.exit(main())
