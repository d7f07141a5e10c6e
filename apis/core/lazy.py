"""Modules imported on first use.

The HTTP process builds every served family's routes and request models but never runs a model.
The model modules import their libraries (open_clip, timm, sam2, sam3, onnxruntime and, through
them, torchvision and ``torch._dynamo``): seconds of start-up and hundreds of MB that only the
workers use. A family's API module therefore takes its model module through :func:`lazy_module`;
the first attribute read (in the worker, from ``setup``) runs the real import.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module whose code runs on its first attribute access (the standard
    library's :class:`importlib.util.LazyLoader`); the module itself if it is already imported."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
