"""CLIP (open_clip): image and text embeddings, dense features, zero-shot classification."""

from __future__ import annotations

import os

from apis.core.settings import ModelEntry
from apis.core.weights import WeightsUnavailable
from apis.families import register_family


def download(entry: ModelEntry) -> list[str]:
    """open_clip's own download (``hf-hub:`` names read the architecture from the repo too)."""
    import open_clip
    from huggingface_hub import hf_hub_download

    from apis.open_clip_internals import download_from_hf

    if entry.name.startswith("hf-hub:"):
        repo = entry.name.removeprefix("hf-hub:")
        return [hf_hub_download(repo, "open_clip_config.json"), download_from_hf(repo)]
    cfg = open_clip.get_pretrained_cfg(entry.name, entry.pretrained)
    if not cfg:
        raise WeightsUnavailable(
            f"clip model {entry.name}: open_clip has no pretrained weights '{entry.pretrained}' for it "
            "(open_clip.list_pretrained() lists them); or give `weights`: a local file or hf://<org>/<repo>/<file>"
        )
    return [open_clip.download_pretrained(cfg)]


def hub_repo(entry: ModelEntry) -> str | None:
    import open_clip

    if entry.name.startswith("hf-hub:"):
        return entry.name.removeprefix("hf-hub:")
    # 'org/repo/' or 'org/repo/file', split as open_clip's download_pretrained splits it
    hub = open_clip.get_pretrained_cfg(entry.name, entry.pretrained).get("hf_hub", "")
    return os.path.split(hub)[0] or None


register_family("clip", api="apis.clip.api:ClipAPI", download=download, hub_repo=hub_repo, embeddings=True)
