"""Model registry: the models an operator allows, and how a request's fields pick one.

Different spellings of one model (case, ``_`` vs ``-``, explicit aliases) resolve to the same
entry, so they share one loaded instance per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from apis.core.errors import APIError
from apis.core.settings import ModelEntry

Key = tuple[str, ...]


def canonical(*parts: str | None) -> Key:
    """Spelling-insensitive key: lower case, '_' and '-' equal, surrounding blanks dropped."""
    return tuple((p or "").strip().lower().replace("_", "-") for p in parts)


class ModelRegistry:
    """Maps request fields to configured :class:`ModelEntry` objects for one family."""

    def __init__(
        self,
        family: str,
        entries: Sequence[ModelEntry],
        fields: Sequence[str],
        key: Callable[..., Key] = canonical,
        fill_defaults: bool = True,
    ):
        self.family = family
        self.entries = list(entries)
        self.fields = tuple(fields)
        self._key = key
        self._fill = fill_defaults
        self._by_key: dict[Key, ModelEntry] = {}
        for entry in self.entries:
            spellings = [(entry.name, entry.pretrained)]
            spellings += [tuple(a) if isinstance(a, list) else (a, entry.pretrained) for a in entry.aliases]
            for spelling in spellings:
                k = key(*spelling[: len(self.fields)])
                other = self._by_key.get(k)
                if other is not None and other is not entry:
                    raise ValueError(f"{family}: {spelling} names both {other.name} and {entry.name}")
                self._by_key[k] = entry

    @property
    def default(self) -> ModelEntry:
        return self.entries[0]

    def id_of(self, entry: ModelEntry) -> str:
        return "/".join(p for p in (entry.name, entry.pretrained)[: len(self.fields)] if p)

    def by_id(self, model_id: str) -> ModelEntry:
        return next(e for e in self.entries if self.id_of(e) == model_id)

    def available(self) -> list[str]:
        return [self.id_of(e) for e in self.entries]

    def resolve(self, *requested: str | None) -> ModelEntry:
        """The entry a request asks for; all fields None means the configured default.

        With ``fill_defaults`` a field left None takes the default model's value (CLIP: a name
        alone means the default's pretrained tag); without, the key function gets the Nones.
        """
        if all(r is None for r in requested):
            return self.default
        filled = list(requested)
        if self._fill:
            defaults = (self.default.name, self.default.pretrained)
            filled = [r if r is not None else d for r, d in zip(requested, defaults, strict=False)]
        entry = self._by_key.get(self._key(*filled))
        if entry is None:
            asked = " + ".join(
                f"{f}={v!r}" for f, v in zip(self.fields, filled, strict=True) if v is not None
            )
            raise APIError(
                400,
                f"unknown {self.family} model ({asked}); this server offers: {', '.join(self.available())}",
                param=self.fields[0],
                code="model_not_found",
            )
        return entry
