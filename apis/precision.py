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
