"""A node's memory budget for its shards' vector indexes: cold shards' HNSW graphs leave memory.

Each shard's Chroma index holds its HNSW graph in memory once used: about 2.6 KiB per vector with
MiniLM's 384 dimensions (`BYTES_PER_VECTOR`, measured: docs/benchmarks.md, Memory). A node whose
shards together hold more than `index_memory_mb` closes the least recently used shards' Chroma
clients until the loaded indexes fit again; the next query or index chunk of a closed shard opens it
again (its first query pays the load: about 50 ms for 10,000 vectors here). Chroma's own
`chroma_memory_limit_bytes` cannot do this: its Rust client ignores the setting, and each shard has
a client of its own.

The sizes are estimates from vector counts (the index's own allocations are in Chroma's Rust core,
out of Python's sight). The index in use is never closed, so one shard larger than the whole budget
still serves. Every call comes from the node's store thread, like the shards' own.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

# Anonymous memory per vector of a loaded Chroma HNSW index, on top of the vector's own 4 bytes
# per dimension: neighbour lists (2 x connectivity links at level 0), labels, ids and the
# allocator's share. Measured with 384 dimensions and connectivity 16 (loadtest/memory_profile.py).
OVERHEAD_PER_VECTOR = 1100


def bytes_per_vector(dimension: int) -> int:
    return 4 * dimension + OVERHEAD_PER_VECTOR


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

