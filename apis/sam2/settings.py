"""SAM 2's config section (``sam2:``)."""

from __future__ import annotations

from pydantic import Field

from apis.core.settings import CachedFamily, VideoSettings


class Sam2Family(CachedFamily):
    """SAM 2: the image routes' cache, and its video tracking sessions."""

    video: VideoSettings = Field(default_factory=VideoSettings)
    prompt_threads: int = Field(
        1,
        ge=0,
        description="Threads torch uses on CPU for a prompt's mask decoder (prompt_mask); 0: all of the "
        "worker's. Its ops are small, so a second thread costs more in hand-offs than it computes: on a "
        "2-core CPU a hiera_l click took 98 ms and 98 CPU ms on one, 142 ms and 155 CPU ms on two.",
    )
