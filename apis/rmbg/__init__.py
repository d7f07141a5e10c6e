"""RMBG: background removal with an ONNX model (RMBG-2.0, RMBG-1.4, BiRefNet)."""

from __future__ import annotations

from apis.core.settings import ModelEntry
from apis.core.weights import WeightsUnavailable
from apis.families import register_family
from apis.rmbg.settings import RmbgFamily


def download(entry: ModelEntry) -> list[str]:
    """No library download: the config names the ONNX file."""
    raise WeightsUnavailable(
        f"rmbg model {entry.name}: give `weights`: hf://briaai/RMBG-2.0/onnx/model.onnx (or RMBG-1.4), "
        "or the path of a local .onnx file"
    )


register_family("rmbg", settings=RmbgFamily, api="apis.rmbg.api:RmbgAPI", download=download)
