"""SAM 3's config section (``sam3:``)."""

from __future__ import annotations

from pydantic import Field

from apis.core.settings import CachedFamily, VideoSettings


class Sam3Family(CachedFamily):
    """SAM 3's instance filters (what a request gets when it leaves them out), and its video
    tracking sessions."""

    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Keep instances scoring above this.")
    epsilon_factor: float = Field(
        0.02, ge=0.0, le=1.0, description="Polygon simplification (approxPolyDP), x the contour perimeter."
    )
    min_area: float = Field(100, ge=0.0, description="Drop instances whose polygon covers fewer pixels.")
    prompt_chunk: int = Field(
        8,
        ge=1,
        description="Find-queries (a text prompt, with or without boxes) per detector forward: a request's "
        "prompts, and those of the requests batched with it, run this many at a time. Peak memory grows "
        "with it; 1 runs them one at a time.",
    )
    video: VideoSettings = Field(default_factory=VideoSettings)
