"""The registry of model families. Each family registers itself where it is defined, in its
package's ``__init__.py`` (:func:`register_family`), as timm's models register themselves; the
config sections, the weight downloads, the server's LitAPIs and the ``/v1`` model list are read
from here.

Every subpackage of ``apis`` is imported once, when this module is, so a new folder
``apis/<name>/`` that registers is served with no other edit; ``VISIONSERVE_FAMILIES`` (module
names, comma-separated, importable from ``sys.path``) adds families from outside the project.
Registering reads no model library: the LitAPI class is named as ``"module:Class"`` and imported
only when the family is served, and a download imports its library when it runs. Worker
processes inherit the environment, so each process registers the same families.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from apis.core.settings import Family, ModelEntry

#: Extra family modules to import: comma-separated names.
FAMILIES_ENV = "VISIONSERVE_FAMILIES"


@dataclass(frozen=True)
class FamilyEntry:
    """What the server knows of one family."""

    settings: type[Family]  # its config section (``<name>:`` in the YAML)
    api: str  # "module:Class" of its FamilyAPI
    download: Callable[[ModelEntry], list[str]]  # the library's own download of a model's weights
    hub_repo: Callable[[ModelEntry], str | None] | None = None  # the hub repo it downloads from
    embeddings: bool = False  # its models are listed by /v1/models and served by /v1/embeddings

    def api_class(self) -> type:
        module, _, name = self.api.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, FamilyEntry] = {}


def register_family(
    name: str,
    *,
    api: str,
    download: Callable[[ModelEntry], list[str]],
    settings: type[Family] = Family,
    hub_repo: Callable[[ModelEntry], str | None] | None = None,
    embeddings: bool = False,
) -> FamilyEntry:
    """Add the family served under ``/<name>/...`` and configured by the ``<name>:`` section;
    ``embeddings``: its API has an ``embed`` route (apis/vectors.py's VectorsRoute) that
    ``/v1/embeddings`` sends its models' requests to."""
    entry = FamilyEntry(settings, api, download, hub_repo, embeddings)
    if FAMILIES.get(name, entry) != entry:
        raise ValueError(f"two families registered as {name!r}: {FAMILIES[name].api} and {api}")
    FAMILIES[name] = entry
    return entry


def _import_families() -> None:
    for module in pkgutil.iter_modules(importlib.import_module("apis").__path__):
        if module.ispkg:
            importlib.import_module(f"apis.{module.name}")
    for name in os.environ.get(FAMILIES_ENV, "").split(","):
        if name.strip():
            importlib.import_module(name.strip())


_import_families()
