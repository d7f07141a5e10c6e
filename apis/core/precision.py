"""Compute precision of a loaded model: float32 as is, bfloat16/float16 under ``torch.autocast``."""

from __future__ import annotations

import contextlib

import torch


class Autocast:
    """Mixin for model holders that have a ``device`` and a compute ``dtype``."""

    device: torch.device
    dtype: torch.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
