"""CLIP request options that both the request schemas and the model maths name. Kept apart from
:mod:`apis.clip.model` so that the HTTP process, which imports the schemas, does not import
open_clip."""

from __future__ import annotations

from typing import Literal

SimilarityMode = Literal["dot", "cosine"]
