"""SAM 2: automatic and prompted masks on images, and video tracking sessions."""

from __future__ import annotations

from apis.core.settings import ModelEntry
from apis.families import register_family
from apis.sam2.settings import Sam2Family


def download(entry: ModelEntry) -> list[str]:
    from apis.sam2.internals import hf_download

    return [hf_download(hub_repo(entry))]


def hub_repo(entry: ModelEntry) -> str:
    from apis.sam2.model import hf_repo

    return hf_repo(entry)


register_family(
    "sam2", settings=Sam2Family, api="apis.sam2.api:Sam2API", download=download, hub_repo=hub_repo
)
