"""What scoring reads of each memory of a node's shards, kept in memory for spanning queries.

Every candidate of a query without an entity is scored on what `CANDIDATE_COLUMNS` (node/store/
search.py) reads: its id, time, kind, exact vector and whether it states a fact. Read from the
shards, that was a statement per shard with candidates (1.5 ms of a 7 ms search on two cores:
docs/benchmarks.md, "The router embeds, and scoring reads no shard"); held as a tuple per memory in
a dict per shard, a look-up and a tuple per candidate (0.7 ms of Python for ~190 of them). Here
they are columns of the index's slots (node/node_slots.py), so the candidates that the vectors and
the lexicon propose, as slots, are scored in a few array operations (`scores`). The exact float32
vector is most of a row's size: scores stay exact, as the 8-bit and 4-bit codes
(node/node_vectors.py) only propose candidates.
"""

from __future__ import annotations

import sys

import numpy as np

from node.ranking import RankingConfig
from node.node_slots import Slots
from node.store.search import fused_scores


class CandidateRows:
    def __init__(self, slots: Slots, dimension: int) -> None:
        self.slots = slots
        self.dimension = dimension
        slots.add("vector", np.float32, dimension)
        slots.add("memory_id", object)
        slots.add("kind", object)
        slots.add("states_fact", bool)

    @property
    def nbytes(self) -> int:
        """About: the live rows' vectors, and some 100 bytes a row of id and references (traced:
        1.6 KiB a row at 384 dimensions)."""
        return len(self.slots.slot_of) * (self.dimension * 4 + 100)

    def put(self, slots: np.ndarray, rows: list) -> None:
        """Rows at `slots` (new ones: node/node_slots.py), (rowid, memory_id, created_at_ms, kind,
        vector, states a fact) each, as CANDIDATE_COLUMNS reads them."""
        columns = self.slots.columns
        columns["vector"][slots] = np.frombuffer(b"".join(r[4] for r in rows), dtype=np.float32).reshape(
            len(rows), self.dimension)
        columns["memory_id"][slots] = [r[1] for r in rows]
        columns["kind"][slots] = [r[3] if r[3] is None else sys.intern(r[3]) for r in rows]  # a few kinds, shared
        columns["states_fact"][slots] = [bool(r[5]) for r in rows]

    def row(self, slot: int) -> tuple:
        """One slot's row as CANDIDATE_COLUMNS reads it (tests compare them with the shards')."""
        c = self.slots.columns
        return (int(c["rowid"][slot]), c["memory_id"][slot], int(c["created_at_ms"][slot]), c["kind"][slot],
                c["vector"][slot].tobytes(), int(c["states_fact"][slot]))

    def scores(self, slots: np.ndarray, query_vector: np.ndarray, turn: np.ndarray, window: np.ndarray,
               max_turn: float, max_window: float, as_of: int | None, config: RankingConfig) -> np.ndarray:
        """The fused score of each of `slots` before fact validity (node.store.search.fused_scores)."""
        c = self.slots.columns
        return fused_scores(c["vector"][slots], c["created_at_ms"][slots], c["kind"][slots], query_vector, turn, window,
                            max_turn, max_window, as_of, config)
