"""A least-recently-used map with hit and miss counters, bounded by the total weight of its values.

The node's two caches keep one each: `node.embedder.EmbeddingCache` (query vectors, every entry
weighs 1, so the bound is a number of entries) and `node.vector_cache.VectorCache` (entities'
matrices, weighed in bytes). The order, the counting and the eviction are the same for both, so
they live here once; each cache adds only its own keys and rules.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, capacity: int, weigh: Callable[[V], int] = lambda value: 1,
                 removed: Callable[[K, V], None] | None = None) -> None:
        self.capacity = capacity  # the most the values may weigh together
        self.weigh = weigh
        self.removed = removed  # told of every entry that leaves: replaced, evicted or popped
        self.size = 0  # what the values weigh together
        self.hits = 0
        self.misses = 0
        self.entries: OrderedDict[K, V] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: K) -> bool:
        return key in self.entries  # not counted as a hit or a miss

    def get(self, key: K) -> V | None:
        """The value of `key`, now the most recently used; None (a miss) when there is none."""
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> bool:
        """Keep `value` as the most recently used, then drop the least recently used entries until
        the rest fit. A value that alone weighs more than `capacity` is not kept (False)."""
        weight = self.weigh(value)
        if weight > self.capacity:
            return False
        self.pop(key)
        self.entries[key] = value
        self.size += weight
        while self.size > self.capacity:
            self.pop(next(iter(self.entries)))
        return True

    def pop(self, key: K) -> None:
        value = self.entries.pop(key, None)
        if value is not None:
            self.size -= self.weigh(value)
            if self.removed is not None:
                self.removed(key, value)
