"""SAM 2's config section (``sam2:``)."""

from __future__ import annotations

from pydantic import Field

from apis.core.settings import CachedFamily, VideoSettings


class Sam2Family(CachedFamily):
    """SAM 2: the image routes' cache, and its video tracking sessions."""

    video: VideoSettings = Field(default_factory=VideoSettings)
    prompt_threads: int = Field(
        0,
        ge=0,
        description="Threads torch uses on CPU for each prompt's mask decoder (prompt_mask); 0 adapts to "
        "the batch: a lone prompt gets all the worker's threads, several share them (one each first). "
        "On a quiet 2-core CPU a hiera_l click's decoder took 39 ms on two threads and 67 ms on one; "
        "with another job runnable, two lose to their hand-offs between the decoder's small ops (155 vs "
        "92 ms), so 1 suits a machine that is busy with other work.",
    )
    parallel_prompts: int = Field(
        0,
        ge=0,
        description="Prompts of one batch (prompt_mask) decoded at once on CPU, each on its own thread; "
        "0: as many as the worker has threads (or threads / prompt_threads); 1: one after another "
        "(always so on a GPU). On a 2-core CPU four hiera_l clicks took 65 ms each on two threads, "
        "96 ms one after another.",
    )
    trace_decoder: bool = Field(
        True,
        description="Run prompt_mask's prompt encoder and mask decoder on CPU as a torch.jit graph "
        "(traced at the first prompt of each kind: points, box, mask input, multimask; for hiera_l about "
        "0.3 s and 10 MB each; float32 only): no Python between its ops, the same answers. On a 2-core "
        "CPU a hiera_l click's decoder took 35 ms on two threads, 39 ms without. false: eager, as on a GPU.",
    )
