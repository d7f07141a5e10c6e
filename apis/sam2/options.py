"""SAM 2 variant names and auto_mask presets, which the HTTP side (model selection, request
schemas) and the model maths both read. Kept apart from :mod:`apis.sam2.model` so that the HTTP
process does not import sam2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
SIZE_WORDS = {"tiny": "t", "small": "s", "base_plus": "b+", "baseplus": "b+", "large": "l"}
VARIANT = re.compile(r"(sam2(?:\.1)?)_hiera_(t|s|b\+|l|tiny|small|base_?plus|large)")


def variant_name(text: str | None) -> str | None:
    """Canonical name of a SAM 2 variant from any spelling of its config, checkpoint or HF id.

    'configs/sam2.1/sam2.1_hiera_l.yaml', './checkpoints/sam2.1_hiera_large.pt' and
    'facebook/sam2.1-hiera-large' all give 'sam2.1_hiera_l'. Other names are only normalised
    (case, '-' vs '_', folder and extension dropped).
    """
    if not text or not text.strip():
        return None
    base = Path(text.strip()).name.lower().replace("-", "_")
    base = re.sub(r"\.(yaml|yml|pt|pth|safetensors|ckpt)$", "", base)
    m = VARIANT.fullmatch(base)
    if m is None:
        return base
    size = SIZE_WORDS.get(m.group(2), m.group(2))
    return f"{m.group(1)}_hiera_{size}"


#: The seed's presets; explicit request fields override them.
PRESETS: dict[str, dict[str, Any]] = {
    "coarse": {
        "points_per_side": 16,
        "points_per_batch": 64,
        "pred_iou_thresh": 0.8,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "crop_n_layers": 0,
        "crop_n_points_downscale_factor": 1,
        "min_mask_region_area": 100,
        "use_m2m": False,
    },
    "fine_grained": {
        "points_per_side": 64,
        "points_per_batch": 128,
        "pred_iou_thresh": 0.7,
        "stability_score_thresh": 0.92,
        "stability_score_offset": 0.7,
        "crop_n_layers": 1,
        "crop_n_points_downscale_factor": 2,
        "min_mask_region_area": 25,
        "use_m2m": True,
    },
}
_PRESET_COMMON = {
    "mask_threshold": 0.0,
    "box_nms_thresh": 0.7,
    "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500,
    "multimask_output": True,
    "point_grids": None,
}
for _preset in PRESETS.values():
    _preset.update(_PRESET_COMMON)


def auto_settings(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's generator settings with the request's explicit (non-None) values on top."""
    settings = dict(PRESETS[preset])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("point_grids") is not None:
        settings["points_per_side"] = None  # the generator takes one or the other
    return settings
