"""An entity's vectors in memory, for the exact dense scan of small scopes.

Scanning an entity's vectors out of SQLite costs 0.7-2 ms for 1,000 memories (its rows share pages
with other entities' rows); the same scan over a matrix already in memory costs 0.1 ms. A node
keeps one `VectorCache` for all its shards: least recently used entities leave first once it holds
`max_bytes`. A shard drops an entity's entry whenever it writes that entity, so an entry is never
stale; the next query loads it again. A query without an entity scans a whole shard: its matrix is
an entry too (`WHOLE_SHARD`), dropped by any write to the shard.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from node.lru import LRU


WHOLE_SHARD = None  # the entity key of a shard's entry for all its memories (queries without an entity)


class EntityVectors(NamedTuple):
    rowids: np.ndarray  # int64, one per memory
    created_at_ms: np.ndarray  # int64
    matrix: np.ndarray  # float32 (memories, dimension), L2-normalised rows

    @property
    def nbytes(self) -> int:
        return self.rowids.nbytes + self.created_at_ms.nbytes + self.matrix.nbytes


class VectorCache:
    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.shard_bytes = 0  # of `bytes`, whole shards' entries: at most half (`room_for_shard`)
        self._entries: LRU[tuple[int, str | None], EntityVectors] = LRU(
            max_bytes, weigh=lambda entry: entry.nbytes, removed=self._removed)

    @property
    def bytes(self) -> int:
        return self._entries.size

    @property
    def hits(self) -> int:
        return self._entries.hits

    @property
    def misses(self) -> int:
        return self._entries.misses

    def get(self, shard: int, entity_id: str | None) -> EntityVectors | None:
        return self._entries.get((shard, entity_id))

    def __contains__(self, key: tuple[int, str | None]) -> bool:
        return key in self._entries  # not counted as a hit or a miss

    def room_for_shard(self, nbytes: int) -> bool:
        """Whether a whole shard's entry of `nbytes` may come in: whole shards hold at most half the
        cache, so queries without an entity never push every entity out (and a node whose shards do
        not fit scans the rest as before, instead of cycling them through the cache)."""
        return self.shard_bytes + nbytes <= self.max_bytes // 2

    def put(self, shard: int, entity_id: str | None, entry: EntityVectors) -> None:
        if self._entries.put((shard, entity_id), entry) and entity_id is WHOLE_SHARD:
            self.shard_bytes += entry.nbytes

    def drop(self, shard: int, entity_id: str) -> None:
        """Forget an entity's entry, and its shard's whole-shard one (`WHOLE_SHARD`): it wrote."""
        self._entries.pop((shard, entity_id))
        self._entries.pop((shard, WHOLE_SHARD))

    def drop_shard(self, shard: int) -> None:
        """Forget a shard's entries: it left this node, or came back with writes made elsewhere."""
        for key in [k for k in self._entries.entries if k[0] == shard]:
            self._entries.pop(key)

    def _removed(self, key: tuple[int, str | None], entry: EntityVectors) -> None:
        if key[1] is WHOLE_SHARD:
            self.shard_bytes -= entry.nbytes
