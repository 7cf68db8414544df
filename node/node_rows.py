"""What scoring reads of each memory of a node's shards, kept in memory for spanning queries.

Every candidate of a query without an entity is scored on what `CANDIDATE_COLUMNS` (node/store/
search.py) reads: its id, time, kind, exact vector and whether it states a fact. Read from the
shards, that was a statement per shard with candidates, about 32 a query on a node of 32 shards:
1.5 ms of a 7 ms search on two cores (docs/benchmarks.md, "The router embeds, and scoring reads
no shard"). Here each shard's rows are a dict by rowid of those same tuples, kept current with the
rest of the node index (node/node_index.py), so scoring reads no shard. The exact float32 vector is
most of a row's size: scores stay exact, as the 8-bit and 4-bit codes (node/node_vectors.py) only
propose candidates.
"""

from __future__ import annotations

from typing import Iterable


class CandidateRows:
    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self._shards: dict[int, dict[int, tuple]] = {}

    @property
    def nbytes(self) -> int:
        """About: the vector's bytes and some 330 bytes of Python objects a row (tuple, id, dict slot)."""
        return sum(map(len, self._shards.values())) * (self.dimension * 4 + 330)

    def memories(self, shard: int) -> int:
        """How many rows of a shard are held."""
        return len(self._shards.get(shard, ()))

    def put(self, shard: int, rows: Iterable[tuple]) -> None:
        """A shard's rows, (rowid, memory_id, created_at_ms, kind, vector, states a fact) each."""
        self._shards[shard] = {r[0]: tuple(r) for r in rows}

    def update(self, shard: int, gone: list[int], rows: list) -> None:
        """Forget the rows of `gone`, then hold `rows` (as they are now)."""
        held = self._shards[shard]
        for rowid in gone:
            held.pop(rowid, None)
        held.update((r[0], tuple(r)) for r in rows)

    def drop(self, shard: int) -> None:
        self._shards.pop(shard, None)

    def of(self, shard: int, rowids: list[int]) -> list[tuple]:
        """The rows of `rowids` of a shard, in that order (each one held: the index is current)."""
        held = self._shards[shard]
        return [held[r] for r in rowids]
