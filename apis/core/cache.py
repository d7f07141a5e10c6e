"""LRU cache of encoded images, shared by the families that prompt one image many times (SAM 2, SAM 3).

Entries are keyed by image_id (apis/core/images.py: the SHA-256 of the image file), so a request
that sends only the id finds the entry a request with the image made, in the one cache of each
model in each worker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class LRUCache(Generic[T]):
    """Least-recently-used map with hit/miss counters for ``/info``; capacity 0 disables it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, T] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` is cached, without counting a hit or a miss."""
        return key in self._items

    def get(self, key: str) -> T | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: T) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def values(self) -> list[T]:
        return list(self._items.values())

    def fetch(self, keys: Sequence[str], compute: Callable[[list[int]], list[T]]) -> list[T]:
        """The values of ``keys``: cached ones reused, the missing ones made by ONE call of
        ``compute`` (given the position of each missing key's first occurrence, so a batch is
        encoded together) and cached. Each distinct key counts one hit or one miss."""
        distinct = list(dict.fromkeys(keys))
        found = {k: v for k in distinct if (v := self.get(k)) is not None}
        missing = [k for k in distinct if k not in found]
        if missing:
            made = compute([keys.index(k) for k in missing])
            for k, v in zip(missing, made, strict=True):
                self.put(k, v)
                found[k] = v
        return [found[k] for k in keys]

    def fetch_or_find(
        self, keys: Sequence[str], sources: Sequence[object | None], compute: Callable[[list[int]], list[T]]
    ) -> list[T | None]:
        """:meth:`fetch` for the keys whose source (an image) is given; the others are only looked
        up, after this batch's own entries are made: None where no entry exists."""
        given = [i for i, s in enumerate(sources) if s is not None]
        made = self.fetch([keys[i] for i in given], lambda todo: compute([given[j] for j in todo]))
        batch = {keys[i]: v for i, v in zip(given, made, strict=True)}
        return [batch[k] if k in batch else self.get(k) for k in keys]

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._items), "capacity": self.capacity}


def cache_stats(models: Mapping[str, Any]) -> dict[str, dict]:
    """``/info`` counters of a family that caches encoded images (SAM 2, SAM 3), per model id:
    its cache's hits, misses and size, how many images its encoder ran on, and its encoder's
    forwards by batch size."""
    return {
        "embedding_cache": {k: m.cache.stats() for k, m in models.items()},
        "encoded_images": {k: m.encoded_images for k, m in models.items()},
        "encoder_batch_sizes": {
            k: {str(size): n for size, n in sorted(m.encoder_batches.items())} for k, m in models.items()
        },
    }
