"""SAM 2 video tracking sessions on sam2's own ``SAM2VideoPredictor``, without HTTP.

A session is the library's inference state, built from frames in memory instead of
``init_state``'s file loader, and driven by the library's own methods
(``add_new_points_or_box``, ``add_new_mask``, ``propagate_in_video``), so its masks are the
library's. Two things are added:

- Frames are held as the resized uint8 pixels and normalised when the model reads one, with
  the same arithmetic as sam2's JPEG loader (float32 values identical, a quarter of the memory).
- Live sessions (no clip: frames arrive one by one) track each frame as it comes and forget
  what the model's memory window no longer reads: only the newest frame's pixels are held, and
  of the per-frame outputs only the conditioning (prompted) frames and the last
  ``max(num_maskmem - 1, max_obj_ptrs_in_encoder - 1)`` frames, so memory stays flat however
  long the stream runs.

Live tracking equals offline propagation: the library scales its object-pointer positions by
``min(num_frames, max_obj_ptrs_in_encoder)``, and a live stream has no length, so a live
session counts as an unbounded clip; its frames 0..n equal offline propagation over any clip
of at least ``max_obj_ptrs_in_encoder`` (16) frames that starts with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from sam2.sam2_video_predictor import SAM2VideoPredictor

from apis.core.errors import APIError
from apis.core.video import FrameResult, TrackedObject, check_frame
from apis.sam2 import internals

__all__ = ["FrameResult", "TrackedObject", "VideoSession"]

internals.silence_progress_bars()

LIVE_LENGTH = 2**31 - 1  # the num_frames a live session shows the library: an unbounded clip
DIRECTIONS = ("forward", "backward", "both")


class Frames:
    """A session's frames, resized to the model's square input and held as uint8; indexing
    gives the normalised float32 (3, S, S) tensor ``load_video_frames`` would have made."""

    MEAN = torch.tensor((0.485, 0.456, 0.406), dtype=torch.float32)[:, None, None]
    STD = torch.tensor((0.229, 0.224, 0.225), dtype=torch.float32)[:, None, None]
    # sam2 divides the uint8 pixels by 255 in float64 and stores float32: the same values
    SCALE = torch.from_numpy(np.arange(256) / 255.0).float()

    def __init__(self, image_size: int, device: torch.device):
        self.image_size = image_size
        self.device = device
        self.held: dict[int, torch.Tensor] = {}

    def add(self, index: int, frame: np.ndarray) -> None:
        resized = np.asarray(Image.fromarray(frame).resize((self.image_size, self.image_size)))
        self.held[index] = torch.from_numpy(resized.transpose(2, 0, 1).copy()).to(self.device)

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = self.held.get(index)
        if pixels is None:
            raise APIError(400, f"frame {index} is no longer held by this live session", param="frame_index")
        scale = self.SCALE.to(pixels.device)
        img = scale[pixels.long()]
        img -= self.MEAN.to(pixels.device)
        img /= self.STD.to(pixels.device)
        return img

    def __len__(self) -> int:
        return len(self.held)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.held.values())


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the tensors reachable from ``obj``, each storage counted once."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


class VideoSession:
    """One clip or live stream, owned by one worker (its state cannot move).

    Cheap: ``describe``, ``close``. Expensive (the model runs): ``add_prompt`` (one frame's
    encoder if not cached, then the mask decoder), each step of ``propagate`` (one frame),
    ``add_frame`` (one frame).
    """

    def __init__(
        self, predictor: SAM2VideoPredictor, state: dict, frames: Frames, live: bool, dtype: torch.dtype
    ):
        self.predictor = predictor
        self.state: dict | None = state
        self.frames = frames
        self.live = live
        self.dtype = dtype
        self.num_frames = 0 if live else internals.num_frames(state)
        self.height, self.width = internals.video_size(state)

    @classmethod
    def open(
        cls,
        predictor: SAM2VideoPredictor,
        frames: Sequence[np.ndarray] | None,
        *,
        offload_video_to_cpu: bool = False,
        offload_state_to_cpu: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> VideoSession:
        """A session over ``frames`` (RGB uint8, one size), or a live one when None. The state
        has the keys and meaning of ``SAM2VideoPredictor.init_state``'s; ``offload_video_to_cpu``
        keeps the frames in CPU memory, ``offload_state_to_cpu`` the per-frame outputs (both
        as in the library). ``dtype`` other than float32 runs the model under autocast."""
        internals.install_memory_dtype_fix(predictor)
        device = predictor.device
        store = Frames(predictor.image_size, torch.device("cpu") if offload_video_to_cpu else device)
        size: tuple[int, int] | None = None
        if frames is not None:
            if len(frames) == 0:
                raise APIError(400, "the video has no frames", param="frames")
            for i, frame in enumerate(frames):
                frame = check_frame(frame, size, f"frame {i}")
                size = frame.shape[:2]
                store.add(i, frame)
        length = LIVE_LENGTH if frames is None else len(frames)
        state = internals.new_inference_state(
            store, length, size, device, offload_video_to_cpu, offload_state_to_cpu
        )
        return cls(predictor, state, store, frames is None, dtype)

    # ------------------------------------------------------------------------- helpers

    def _state(self) -> dict:
        if self.state is None:
            raise APIError(404, "this video session is closed", code="session_not_found")
        return self.state

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.predictor.device.type, dtype=self.dtype)

    def _score(self, obj_idx: int, frame_index: int) -> float:
        """Presence probability of an object on a frame, from the output its mask came from
        (0 where the object has none, e.g. before the frame it was first prompted on)."""
        return internals.presence(self._state(), obj_idx, frame_index)

    def _result(self, frame_index: int, obj_ids: list[int], masks: torch.Tensor) -> FrameResult:
        """The library's (objects, 1, H, W) mask logits at the video's size as a FrameResult."""
        binary = (masks[:, 0] > 0.0).cpu().numpy()
        state = self._state()
        return FrameResult(
            frame_index,
            [
                TrackedObject(
                    int(obj_id), binary[i], self._score(internals.object_index(state, obj_id), frame_index)
                )
                for i, obj_id in enumerate(obj_ids)
            ],
        )

    def _check_prompt_frame(self, frame_index: int) -> None:
        if self.live:
            if self.num_frames == 0:
                raise APIError(
                    400, "this live session has no frame yet: add a frame first", param="frame_index"
                )
            if frame_index != self.num_frames - 1:
                raise APIError(
                    400,
                    f"a live session takes prompts on its newest frame, {self.num_frames - 1}, "
                    f"not {frame_index}",
                    param="frame_index",
                )
        elif not 0 <= frame_index < self.num_frames:
            raise APIError(
                400,
                f"frame_index {frame_index} is out of range: the video has {self.num_frames} frames "
                f"(0 to {self.num_frames - 1})",
                param="frame_index",
            )

    # ------------------------------------------------------------------------- prompts

    def add_prompt(
        self,
        frame_index: int,
        obj_id: int,
        *,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        mask: np.ndarray | None = None,
        clear_old_points: bool = True,
    ) -> FrameResult:
        """Clicks and/or a box (pixels of the video), or a mask (bool, the video's size), for one
        object on one frame; answers every object on that frame. Checked before the library
        sees them: a failed call must not leave an object without prompts in the state."""
        state = self._state()
        self._check_prompt_frame(frame_index)
        if mask is not None:
            if points is not None or box is not None:
                raise APIError(400, "give points and/or a box, or a mask, not both", param="mask")
            mask = np.asarray(mask)
            if mask.shape != (self.height, self.width):
                raise APIError(
                    400,
                    f"mask is {mask.shape}; it must be (height, width) = ({self.height}, {self.width}), "
                    "the video's size",
                    param="mask",
                )
            with self._autocast():
                _, ids, masks = self.predictor.add_new_mask(state, frame_index, obj_id, mask.astype(bool))
            return self._result(frame_index, ids, masks)
        pts = lbl = None
        if points is not None or labels is not None:
            pts = np.asarray(points if points is not None else [], dtype=np.float32).reshape(-1, 2)
            lbl = np.asarray(labels if labels is not None else [], dtype=np.int64).ravel()
            if len(pts) != len(lbl):
                raise APIError(
                    400, f"{len(pts)} points but {len(lbl)} labels: give one label per point", param="labels"
                )
            if not np.isin(lbl, (0, 1)).all():
                raise APIError(400, "labels must be 1 (on the object) or 0 (background)", param="labels")
            if not np.isfinite(pts).all():
                raise APIError(400, "points must be finite numbers", param="points")
        if box is not None:
            box = np.asarray(box, dtype=np.float32)
            if box.shape != (4,) or not np.isfinite(box).all():
                raise APIError(400, "box must be [x1, y1, x2, y2] in pixels", param="box")
            if not clear_old_points:
                raise APIError(
                    400, "a box replaces a frame's prompts: use clear_old_points=true with it", param="box"
                )
        if (pts is None or len(pts) == 0) and box is None:
            raise APIError(400, "give points with labels, a box or a mask", param="points")
        if pts is not None and len(pts) == 0:
            pts = lbl = None
        with self._autocast():
            _, ids, masks = self.predictor.add_new_points_or_box(
                state, frame_index, obj_id, points=pts, labels=lbl, box=box, clear_old_points=clear_old_points
            )
        return self._result(frame_index, ids, masks)

    # ------------------------------------------------------------------------- tracking

    def _tracked(self, start: int, max_frames: int | None, reverse: bool) -> Iterator[FrameResult]:
        state = self._state()
        frames = None if max_frames is None else max_frames - 1  # the library counts the frames after start
        run = self.predictor.propagate_in_video(
            state, start_frame_idx=start, max_frame_num_to_track=frames, reverse=reverse
        )
        with contextlib.closing(run):
            while True:
                with self._autocast():
                    step = next(run, None)
                if step is None:
                    return
                yield self._result(*step)

    def propagate(
        self, direction: str = "forward", start_frame_index: int | None = None, max_frames: int | None = None
    ) -> Iterator[FrameResult]:
        """Track the prompted objects through the clip, one frame per ``next()``: forward,
        backward, or both (forward, then backward without the start frame again) from
        ``start_frame_index`` (default: the first prompted frame), at most ``max_frames``
        frames each way. Stopping early (closing the iterator) leaves a usable state."""
        state = self._state()
        if self.live:
            raise APIError(400, "a live session tracks each frame as it is added; propagate needs a clip")
        if direction not in DIRECTIONS:
            raise APIError(400, f"direction must be one of {', '.join(DIRECTIONS)}", param="direction")
        if max_frames is not None and max_frames < 1:
            raise APIError(400, "max_frames must be at least 1", param="max_frames")
        if not internals.object_ids(state):
            raise APIError(400, "no object has a prompt yet: add a prompt first")
        if start_frame_index is not None and not 0 <= start_frame_index < self.num_frames:
            raise APIError(
                400,
                f"start_frame_index {start_frame_index} is out of range: "
                f"the video has {self.num_frames} frames",
                param="start_frame_index",
            )
        return self._propagate(direction, start_frame_index, max_frames)

    def _propagate(self, direction: str, start: int | None, max_frames: int | None) -> Iterator[FrameResult]:
        state = self._state()
        if start is None:  # the library's default, needed here to run "both" from one frame
            self.predictor.propagate_in_video_preflight(state)
            start = internals.first_prompted_frame(state)
        if direction in ("forward", "both"):
            yield from self._tracked(start, max_frames, reverse=False)
        if direction in ("backward", "both"):
            for result in self._tracked(start, max_frames, reverse=True):
                if direction == "backward" or result.frame_index != start:
                    yield result

    def add_frame(self, image: np.ndarray) -> FrameResult:
        """Live only: append a frame and track every object on it at once (the library's
        propagation over that one frame); answers its objects (none before the first prompt)."""
        state = self._state()
        if not self.live:
            raise APIError(400, "frames are added to live sessions only; this session has a clip")
        image = check_frame(image, (self.height, self.width) if self.num_frames else None, "the frame")
        index = self.num_frames
        if index == 0:
            self.height, self.width = image.shape[:2]
            internals.set_video_size(state, self.height, self.width)
        self.frames.add(index, image)
        self.num_frames += 1
        result = FrameResult(index, [])
        if internals.object_ids(state):
            with contextlib.closing(self._tracked(index, 1, reverse=False)) as run:
                result = next(run)
        self._forget(index + 1)
        return result

    def _forget(self, next_frame: int) -> None:
        """Drop what tracking ``next_frame`` and later frames cannot read: older pixels (prompts
        go to the newest frame), and non-conditioning outputs before the oldest frame that the
        memory (``num_maskmem - 1`` frames back, with the eval stride) or the object pointers
        (``max_obj_ptrs_in_encoder - 1`` frames back) of ``next_frame`` reach."""
        state = self._state()
        m = self.predictor
        for index in [i for i in self.frames.held if i < next_frame - 1]:
            del self.frames.held[index]
        oldest = next_frame - 1
        if m.num_maskmem > 2:
            stride = m.memory_temporal_stride_for_eval
            oldest = min(oldest, ((next_frame - 2) // stride) * stride - (m.num_maskmem - 3) * stride)
        if m.use_obj_ptrs_in_encoder:
            oldest = min(oldest, next_frame - (m.max_obj_ptrs_in_encoder - 1))
        internals.drop_outputs_before(state, oldest)

    # ------------------------------------------------------------------------- bookkeeping

    def describe(self) -> dict:
        """``{"num_frames", "objects": [ids], "memory_bytes", "frames_held"}``; memory_bytes counts
        the held frames and every tensor of the state once."""
        state = self._state()
        seen: set[int] = set()
        state_bytes = _tensor_bytes(internals.state_without_frames(state), seen)
        return {
            "num_frames": self.num_frames,
            "objects": [int(i) for i in internals.object_ids(state)],
            "memory_bytes": state_bytes + self.frames.nbytes,
            "frames_held": len(self.frames),
        }

    def close(self) -> None:
        """Free the state and frames now (the session is unusable after)."""
        if self.state is not None:
            self.state.clear()
            self.frames.held.clear()
            self.state = None
