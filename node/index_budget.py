"""A node's memory budget for its shards' vector indexes: cold shards' HNSW graphs leave memory.

Each shard's Chroma client holds its HNSW graph in memory once used: about 5.6 MiB per loaded
shard plus 2.0 KiB per vector with MiniLM's 384 dimensions (`index_bytes`, fitted to what closing
the clients freed at 100k, 300k and 1M memories: loadtest/results/memory-profile-2core.md). A node
whose loaded indexes together exceed `index_memory_mb` closes the least recently used shards'
Chroma clients until they fit again; the next query or index chunk of a closed shard opens it again
and pays the load (a shard of 31,000 vectors: p50 240 ms, against 8 ms warm). Chroma's own
`chroma_memory_limit_bytes` cannot do this: its Rust client ignores the setting, and each shard has
a client of its own.

The sizes are estimates from vector counts (the index's own allocations are in Chroma's Rust core,
out of Python's sight). The index in use is never closed, so one shard larger than the whole budget
still serves. Every call comes from the node's store thread, like the shards' own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

# What closing a loaded shard's Chroma client frees: a part per shard (its clients' caches and the
# HNSW graph's fixed allocations) and a part per vector on top of the vector's own 4 bytes per
# dimension (neighbour lists, labels, ids). Fitted with 384 dimensions and connectivity 16.
BYTES_PER_INDEX = 5_600 << 10
OVERHEAD_PER_VECTOR = 540


def index_bytes(vectors: int, dimension: int) -> int:
    """The estimated memory of one loaded shard index holding `vectors` vectors."""
    return BYTES_PER_INDEX + vectors * (4 * dimension + OVERHEAD_PER_VECTOR)


class Loadable(Protocol):
    def memory_bytes(self) -> int: ...

    def unload(self) -> None: ...


class IndexBudget:
    """Which shards' vector indexes are loaded, least recently used first; 0 bytes: no limit."""

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.loads = 0  # indexes opened (the first time, or again after an unload)
        self.unloads = 0  # indexes closed to keep within the budget
        self.load_seconds = 0.0  # time spent opening indexes
        self._loaded: OrderedDict[int, Loadable] = OrderedDict()

    def loaded(self, index: Loadable, seconds: float) -> None:
        """`index` was just opened (in `seconds`): count it, then make room for it."""
        self.loads += 1
        self.load_seconds += seconds
        self.used(index)

    def used(self, index: Loadable) -> None:
        """`index` is in use now: it leaves last; close others while the loaded ones exceed the budget."""
        key = id(index)
        self._loaded[key] = index
        self._loaded.move_to_end(key)
        if not self.max_bytes:
            return
        while len(self._loaded) > 1 and self.bytes > self.max_bytes:
            _, coldest = self._loaded.popitem(last=False)
            coldest.unload()
            self.unloads += 1

    def closed(self, index: Loadable) -> None:
        """`index` was closed by its shard (shard closed, index rebuilt): it no longer counts."""
        self._loaded.pop(id(index), None)

    @property
    def bytes(self) -> int:
        return sum(index.memory_bytes() for index in self._loaded.values())

    @property
    def count(self) -> int:
        return len(self._loaded)

    def stats(self) -> dict[str, float]:
        return {"loaded": self.count, "mb": round(self.bytes / 2**20, 1),
                "budget_mb": round(self.max_bytes / 2**20, 1), "loads": self.loads, "unloads": self.unloads,
                "load_seconds": round(self.load_seconds, 3)}

