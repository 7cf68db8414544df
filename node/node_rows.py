"""What scoring reads of each memory of a node's shards, kept in memory for spanning queries.

Every candidate of a query without an entity is scored on what `CANDIDATE_COLUMNS` (node/store/
search.py) reads: its id, time, kind, exact vector and whether it states a fact. Read from the
shards, that was a statement per shard with candidates (1.5 ms of a 7 ms search on two cores:
docs/benchmarks.md, "The router embeds, and scoring reads no shard"); held as a tuple per memory in
a dict per shard, a look-up and a tuple per candidate (0.7 ms of Python for ~190 of them). Here
they are columns of the index's slots (node/node_slots.py), so the candidates that the vectors and
the lexicon propose, as slots, are scored in a few array operations (`scores`).

The exact float32 vector is most of a row's size (scores stay exact: the 8-bit and 4-bit codes of
node/node_vectors.py only propose candidates). It lives in a matrix of its own, a row per live
slot (`row`): a slot that dies hands its row back at once for the next memory, so memories written
again do not hold a dead vector each until the slots are numbered again.
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
        slots.add("row", np.int32, fill=-1)  # the slot's row of `vectors`; -1: none (yet, or any more)
        slots.add("memory_id", object)
        slots.add("kind", object)
        slots.add("states_fact", bool)
        slots.on_kill.append(self._release)
        self.vectors = np.zeros((1024, dimension), dtype=np.float32)
        self._free = list(range(len(self.vectors) - 1, -1, -1))  # rows no slot holds, the lowest last

    @property
    def nbytes(self) -> int:
        """About: the live rows' vectors, and some 100 bytes a row of id and references (traced:
        1.6 KiB a row at 384 dimensions)."""
        return len(self.slots.slot_of) * (self.dimension * 4 + 100)

    def put(self, slots: np.ndarray, rows: list) -> None:
        """Rows at `slots` (new ones: node/node_slots.py), (rowid, memory_id, created_at_ms, kind,
        vector, states a fact) each, as CANDIDATE_COLUMNS reads them."""
        columns = self.slots.columns
        taken = self._take(len(rows))
        self.vectors[taken] = np.frombuffer(b"".join(r[4] for r in rows), dtype=np.float32).reshape(
            len(rows), self.dimension)
        columns["row"][slots] = taken
        columns["memory_id"][slots] = [r[1] for r in rows]
        columns["kind"][slots] = [r[3] if r[3] is None else sys.intern(r[3]) for r in rows]  # a few kinds, shared
        columns["states_fact"][slots] = [bool(r[5]) for r in rows]

    def row(self, slot: int) -> tuple:
        """One slot's row as CANDIDATE_COLUMNS reads it (tests compare them with the shards')."""
        c = self.slots.columns
        return (int(c["rowid"][slot]), c["memory_id"][slot], int(c["created_at_ms"][slot]), c["kind"][slot],
                self.vectors[c["row"][slot]].tobytes(), int(c["states_fact"][slot]))

    def scores(self, slots: np.ndarray, query_vector: np.ndarray, turn: np.ndarray, window: np.ndarray,
               max_turn: float, max_window: float, as_of: int | None, config: RankingConfig) -> np.ndarray:
        """The fused score of each of `slots` before fact validity (node.store.search.fused_scores)."""
        c = self.slots.columns
        return fused_scores(self.vectors[c["row"][slots]], c["created_at_ms"][slots], c["kind"][slots], query_vector,
                            turn, window, max_turn, max_window, as_of, config)

    @property
    def held(self) -> int:
        """Rows of `vectors` in use (a live slot's each)."""
        return len(self.vectors) - len(self._free)

    def _take(self, n: int) -> np.ndarray:
        """`n` free rows of `vectors`, which grows by half when too few are left."""
        if n > len(self._free):
            old = len(self.vectors)
            size = max(old + old // 2, self.held + n)
            grown = np.zeros((size, self.dimension), dtype=np.float32)
            grown[:old] = self.vectors
            self.vectors = grown
            self._free[:0] = range(size - 1, old - 1, -1)
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return np.asarray(taken[::-1], dtype=np.int64)

    def _release(self, dead: np.ndarray) -> None:
        """Dead slots' rows back to the free ones; their ids let go."""
        columns = self.slots.columns
        rows = columns["row"][dead]
        self._free.extend(rows[rows >= 0].tolist())
        columns["row"][dead] = -1
        columns["memory_id"][dead] = None
