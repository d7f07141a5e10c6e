"""RMBG's config section (``rmbg:``): ONNX models and their processing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from apis.core.settings import Family, ModelEntry


class RmbgModelEntry(ModelEntry):
    """An ONNX background-removal model and its processing. ``preset`` (or a name starting with
    rmbg-2.0, rmbg-1.4 or birefnet) gives the model card's values; the fields below override them."""

    preset: Literal["rmbg-2.0", "rmbg-1.4", "birefnet"] | None = None
    input_size: int | None = Field(None, gt=0, le=4096, description="Square input side; null = preset/ONNX.")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    activation: Literal["sigmoid", "none"] | None = Field(
        None, description="sigmoid: the model outputs logits; none: it outputs probabilities."
    )
    min_max: bool | None = Field(None, description="Stretch each matte to [0, 1] (RMBG-1.4's card).")


class RmbgFamily(Family):
    models: list[RmbgModelEntry] = Field(default_factory=list)
