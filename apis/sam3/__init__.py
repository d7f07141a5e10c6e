"""SAM 3: masks of every instance of a text or box prompt, on images and in video sessions."""

from __future__ import annotations

from apis.core.settings import ModelEntry
from apis.families import register_family
from apis.sam3.settings import Sam3Family

HUB_REPO = "facebook/sam3"


def download(entry: ModelEntry) -> list[str]:
    from sam3.model_builder import download_ckpt_from_hf

    return [download_ckpt_from_hf()]


register_family(
    "sam3", settings=Sam3Family, api="apis.sam3.api:Sam3API", download=download, hub_repo=lambda _: HUB_REPO
)
