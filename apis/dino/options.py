"""DINOv2 request options that both the request schemas and the model maths name. Kept apart
from :mod:`apis.dino.model` so that the HTTP process, which imports the schemas, does not import
timm."""

from __future__ import annotations

from typing import Literal

Facet = Literal["token", "key", "query", "value"]
Pooling = Literal["cls", "mean"]
POOLINGS: tuple[Pooling, ...] = ("cls", "mean")
