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
        "worker's. Its ops are small: with another job runnable a second thread costs more in hand-offs "
        "than it computes (on a 2-core CPU a hiera_l click took 92 ms on one, 155 ms on two); on a quiet "
        "machine two win (53 ms), so 0 suits a machine that serves clicks and little else.",
    )
    parallel_prompts: int = Field(
        0,
        ge=0,
        description="Prompts of one batch (prompt_mask) decoded at once on CPU, each on its own thread "
        "with prompt_threads torch threads; 0: the worker's threads / prompt_threads; 1: one after "
        "another (always so on a GPU). On a 2-core CPU four hiera_l clicks took 65 ms each on two "
        "threads, 96 ms one after another.",
    )
    trace_decoder: bool = Field(
        False,
        description="Run prompt_mask's prompt encoder and mask decoder as a torch.jit graph (traced and "
        "frozen at the first prompt of each kind: points, box, mask input, multimask; float32 only): no "
        "Python between its ops. On a 2-core CPU a hiera_l click took 43 ms on two threads, 53 ms without.",
    )
