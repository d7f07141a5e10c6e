"""DINOv2 (timm): dense features and global image embeddings."""

from __future__ import annotations

from apis.core.settings import ModelEntry
from apis.core.weights import WeightsUnavailable
from apis.families import register_family


def download(entry: ModelEntry) -> list[str]:
    """timm's order: ``model.safetensors``, else ``pytorch_model.bin`` (``load_state_dict_from_hf``)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models import get_pretrained_cfg

    from apis.dino.model import architecture

    name, _ = architecture(entry)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsUnavailable(f"dino model {entry.name}: timm has no hub weights for {name}")
    repo = cfg.hf_hub_id
    if cfg.hf_hub_filename:
        return [hf_hub_download(repo, cfg.hf_hub_filename)]
    try:
        return [hf_hub_download(repo, "model.safetensors")]
    except EntryNotFoundError:  # not on the hub, or offline and not cached: timm then reads this
        return [hf_hub_download(repo, "pytorch_model.bin")]


def hub_repo(entry: ModelEntry) -> str | None:
    from timm.models import get_pretrained_cfg

    from apis.dino.model import architecture

    return get_pretrained_cfg(architecture(entry)[0]).hf_hub_id


register_family("dino", api="apis.dino.api:DinoAPI", download=download, hub_repo=hub_repo, embeddings=True)
