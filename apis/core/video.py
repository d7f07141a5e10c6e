"""Per-frame tracking answers that every video family (SAM 2, SAM 3) shares, without any model
library, so the serving layer renders them to JSON on its own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
