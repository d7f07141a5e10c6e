"""What an operator sets in the YAML, piece by piece: limits, image inputs, models and the settings
of each model family. The whole file's model is :class:`apis.config.ServerConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MiB = 1024 * 1024


class StrictSettings(BaseModel):
    """Settings that refuse unknown keys, so a typo in the YAML is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class Limits(StrictSettings):
    """Caps that keep one request from exhausting the server."""

    max_body_bytes: int = Field(64 * MiB, gt=0, description="Largest request body; larger -> 413.")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest decoded image (width x height).")
    max_image_side: int = Field(16384, gt=0, description="Largest image width or height.")
    max_response_bytes: int = Field(256 * MiB, gt=0, description="Largest dense tensor a response may carry.")
    max_text_chars: int = Field(2000, gt=0, description="Longest text prompt.")
    max_tokens: int = Field(
        32768, gt=0, description="Largest ViT patch grid (rows x columns) a dense request may need."
    )
    max_embed_inputs: int = Field(
        64,
        gt=0,
        description="Most inputs (images + texts) of one /clip/embed, /dino/embed or /v1/embeddings "
        "request, and most labels of one /clip/classify request.",
    )
    max_auto_mask_points: int = Field(
        65536,
        gt=0,
        description="Most SAM 2 auto_mask prompt points over all crop layers (the request's compute).",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="Seconds a request body may take to arrive; -> 408."
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Largest request head (headers); -> 431.")
    max_url_bytes: int = Field(8 * 1024, ge=256, description="Longest request URL; -> 414.")
    max_headers: int = Field(100, ge=10, description="Most request headers; -> 431.")


class UrlInput(StrictSettings):
    """``image_url`` input: off unless enabled; public addresses only unless told otherwise."""

    enabled: bool = False
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names ('example.com', '*.example.com') or IPs/CIDRs; empty = any public host.",
    )
    allow_private_networks: bool = Field(
        False, description="Allow loopback/private/link-local targets (only for trusted networks)."
    )
    timeout_s: float = Field(10.0, gt=0)
    max_redirects: int = Field(3, ge=0)


class PathInput(StrictSettings):
    """``image_path`` input: off unless at least one root folder is named."""

    roots: list[Path] = Field(default_factory=list)


class Inputs(StrictSettings):
    url: UrlInput = Field(default_factory=UrlInput)
    path: PathInput = Field(default_factory=PathInput)


class ModelEntry(StrictSettings):
    """One model an operator allows. ``name``/``pretrained`` are what requests ask for."""

    name: str
    pretrained: str = ""
    weights: str | None = Field(
        None,
        description="'random', a local checkpoint path, hf://<org>/<repo>/<file> (a file on the Hugging Face "
        "hub), or null to let the library fetch `pretrained`.",
    )
    arch_config: Path | None = Field(None, description="Architecture JSON for models the library lacks.")
    aliases: list[list[str] | str] = Field(default_factory=list, description="Other spellings of this model.")

    @property
    def is_random(self) -> bool:
        return self.weights == "random"

    @property
    def weights_source(self) -> str:
        if self.is_random:
            return "random (untrained weights: outputs are meaningless)"
        if self.weights and self.weights.startswith("hf://"):
            return f"hub file {self.weights}"
        if self.weights:
            return f"file {self.weights}"
        return f"library download of '{self.pretrained or self.name}'"


class Family(StrictSettings):
    """Settings shared by every model of one family (clip, dino, ...)."""

    enabled: bool = True
    required: bool = Field(
        True,
        description="false: if the weights cannot be had (gated, missing, offline), serve the other families "
        "without this one (logged, and named by /health and /info) instead of refusing to start.",
    )
    models: list[ModelEntry] = Field(default_factory=list)
    load: Literal["eager", "lazy"] = Field("eager", description="Load at worker start, or on first use.")
    max_batch_size: int = Field(16, ge=1)
    batch_timeout: float = Field(
        0.0,
        ge=0,
        description="Seconds a batch waits, from its first request, for more to arrive (up to "
        "max_batch_size). 0 takes only what is already queued: under load requests pile up while the "
        "worker computes, so batches fill anyway.",
    )
    workers_per_device: int | None = Field(None, ge=1)

    @field_validator("models")
    @classmethod
    def _some_models(cls, v: list[ModelEntry]) -> list[ModelEntry]:
        if not v:
            raise ValueError("list at least one model")
        return v


class CachedFamily(Family):
    """A family whose workers keep image embeddings (SAM 2, SAM 3)."""

    cache_size: int = Field(
        16, ge=0, description="Image embeddings kept per model in each worker (LRU); 0 disables the cache."
    )
    route_by_image: bool = Field(
        True,
        description="With several workers: send the requests on one image to the worker that has it "
        "cached, while that worker's queue is at most max_batch_size longer than the least busy one's.",
    )


class VideoSettings(StrictSettings):
    """Tracking sessions (``/<family>/video/sessions``): each lives in the worker that made it."""

    max_sessions: int = Field(
        4,
        ge=1,
        description="Sessions kept per worker. A new one evicts the least recently used idle session "
        "(its calls then answer 410); when every session is propagating, a new one gets 429.",
    )
    max_frames: int = Field(
        2000, ge=1, description="Most frames of a clip (video, frames or video_path); more -> 413."
    )
    max_video_bytes: int = Field(
        256 * MiB, gt=0, description="Largest encoded clip (video or video_path file); larger -> 413."
    )
    idle_ttl_s: float = Field(
        600.0,
        gt=0,
        description="A session not used for this many seconds is closed; its id then answers 404.",
    )
