"""Modules imported on first use.

The HTTP process builds every served family's routes and request models but never runs a model.
torch and the model modules (open_clip, timm, sam2, sam3, onnxruntime and, through them,
torchvision and ``torch._dynamo``) cost seconds of start-up and hundreds of MB that only the
workers use. A module that the HTTP process imports therefore takes them through
:func:`lazy_module`; the first attribute read (in the worker, from ``setup`` on) runs the real
import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any


class _Deferred(ModuleType):
    """Stands for a module until an attribute is read, then passes every read on to it. It is NOT
    entered in ``sys.modules`` (unlike the standard library's ``LazyLoader``): torch's own import
    walks ``sys.modules`` (``inspect.getmodule``), which would run a half-imported module's code
    from inside torch's. Reads go through ``__getattribute__``, 0.5 us each, since a missed
    module attribute (the ``__getattr__`` path) costs an AttributeError, 4 us."""

    def __getattribute__(self, attr: str) -> Any:
        own = ModuleType.__getattribute__(self, "__dict__")
        module = own.get("_module")
        if module is None:  # the first read: import it
            module = own["_module"] = importlib.import_module(own["__name__"])
        return getattr(module, attr)


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module whose code runs on its first attribute access; the module itself if
    it is already imported. A name that cannot be found fails here, at once."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    return _Deferred(name)
