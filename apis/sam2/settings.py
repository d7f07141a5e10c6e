"""SAM 2's config section (``sam2:``)."""

from __future__ import annotations

from pydantic import Field

from apis.core.settings import CachedFamily, VideoSettings


class Sam2Family(CachedFamily):
    """SAM 2: the image routes' cache, and its video tracking sessions."""

    video: VideoSettings = Field(default_factory=VideoSettings)
