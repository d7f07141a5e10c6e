"""The model families this server knows: the ONE place a family is registered.

Each entry names its config section (``clip:`` in the YAML, with its settings type) and its
LitAPI class. The class is imported only when the family is served, so reading a config does not
import torch or a model library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from apis.core.settings import Family, RmbgFamily, Sam2Family, Sam3Family


@dataclass(frozen=True)
class FamilyEntry:
    settings: type[Family]
    api: str  # "module:Class" of its LitAPI

    def api_class(self) -> type:
        module, _, name = self.api.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, FamilyEntry] = {
    "clip": FamilyEntry(Family, "apis.clip.api:ClipAPI"),
    "dino": FamilyEntry(Family, "apis.dino.api:DinoAPI"),
    "sam2": FamilyEntry(Sam2Family, "apis.sam2.api:Sam2API"),
    "sam3": FamilyEntry(Sam3Family, "apis.sam3.api:Sam3API"),
    "rmbg": FamilyEntry(RmbgFamily, "apis.rmbg.api:RmbgAPI"),
}
