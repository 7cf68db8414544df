"""The slots of a node's index: one row number per memory, shared by all the index's parts.

The lexicon's postings (node/lexicon.py), the rows scoring reads (node/node_rows.py) and the
vectors' segments (node/node_vectors.py) all name a memory by its slot, so the candidates either
retriever proposes are scored with array lookups, with no dict look-up or tuple per candidate
(docs/benchmarks.md, "Slots"). Slot i's columns say whose memory it is (shard, rowid), when it was
made and whose (`entity`: an index into `names`); the parts keep columns of their own here
(`add`), which grow and are numbered again with these.

A memory read again takes a new slot and its old one dies (`live` False; what a part keeps of it
apart from the columns, the rows' exact vectors, is let go at once: `on_kill`). When the dead
outnumber the live (and RENUMBER_AFTER), the lexicon numbers the live again (`renumber`, about
0.1 s for 52,000 memories), and what keeps slots elsewhere (the vectors' segments) is told the new
numbers (`on_renumber`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from node.store.scope import Scope, admitted_names

RENUMBER_AFTER = 65_536  # dead slots before the live are numbered again (or as many as the live)


def key(shard: int, rowid: int) -> int:
    """A memory's key here: shard in the high bits, the shard's rowid in the low 40."""
    return shard << 40 | rowid


class Slots:
    def __init__(self) -> None:
        self.slot_of: dict[int, int] = {}  # key(shard, rowid) -> slot
        self.used = 0  # slots handed out, live or dead
        self.columns: dict[str, np.ndarray] = {}
        self._fill: dict[str, object] = {}  # what a column holds until written
        for name, dtype in (("shard", np.int32), ("rowid", np.int64), ("created_at_ms", np.int64),
                            ("entity", np.int32), ("live", bool)):
            self.add(name, dtype)
        self.names: list[str] = []
        self._name_of: dict[str, int] = {}
        self.on_renumber: list[Callable[[np.ndarray], None]] = []  # told (old slot -> new, -1: dead)
        self.on_kill: list[Callable[[np.ndarray], None]] = []  # told the slots that died

    def add(self, name: str, dtype: type, fill: object = 0) -> None:
        """A column of each slot, `fill` until written."""
        self.columns[name] = np.full(len(self.live) if "live" in self.columns else 1024, fill, dtype=dtype)
        self._fill[name] = fill

    @property
    def shard(self) -> np.ndarray:
        return self.columns["shard"]

    @property
    def rowid(self) -> np.ndarray:
        return self.columns["rowid"]

    @property
    def created_at_ms(self) -> np.ndarray:
        return self.columns["created_at_ms"]

    @property
    def entity(self) -> np.ndarray:
        return self.columns["entity"]

    @property
    def live(self) -> np.ndarray:
        return self.columns["live"]

    @property
    def dead(self) -> int:
        return self.used - len(self.slot_of)

    @property
    def nbytes(self) -> int:
        return sum(self.columns[c].nbytes for c in ("shard", "rowid", "created_at_ms", "entity", "live"))

    def place(self, shard: int, memories: list) -> np.ndarray:
        """New slots for `memories`, (rowid, entity_id, created_at_ms, ...) each, their columns filled;
        rowids not held here (the caller takes and kills the old slots first, keeping its counts)."""
        first = self.used
        self._reserve(len(memories))
        slots = np.arange(first, first + len(memories))
        self.shard[slots] = shard
        self.rowid[slots] = [r[0] for r in memories]
        self.created_at_ms[slots] = [r[2] for r in memories]
        self.entity[slots] = [self._name(r[1]) for r in memories]
        self.live[slots] = True
        self.used += len(memories)
        self.slot_of.update((key(shard, r[0]), slot) for r, slot in zip(memories, slots.tolist()))
        return slots

    def take(self, shard: int, rowids: list[int]) -> list[int]:
        """The slots of a shard's `rowids` held here, no longer found by their keys (`kill` them next)."""
        return [s for s in (self.slot_of.pop(key(shard, r), None) for r in rowids) if s is not None]

    def take_shard(self, shard: int) -> list[int]:
        """All the live slots of a shard, as `take`."""
        slots = np.flatnonzero(self.live[:self.used] & (self.shard[:self.used] == shard))
        for rowid in self.rowid[slots].tolist():
            del self.slot_of[key(shard, rowid)]
        return slots.tolist()

    def kill(self, slots: list[int]) -> None:
        """`slots` die; `on_kill` is told (what a part holds apart from the columns can go now)."""
        if slots:
            dead = np.asarray(slots, dtype=np.int64)
            self.live[dead] = False
            for tell in self.on_kill:
                tell(dead)

    def of(self, memories: list[tuple[int, int]]) -> np.ndarray:
        """The slots of (shard, rowid) pairs, -1 for one not here."""
        return np.fromiter((self.slot_of.get(key(s, r), -1) for s, r in memories), dtype=np.int64, count=len(memories))

    def admitted(self, scope: Scope, shards: set[int] | None) -> np.ndarray | None:
        """Which slots `scope` (its window and prefixes) and `shards` (None: all) admit; None: every one."""
        inside = None if scope.timeless else scope.mask(self.created_at_ms[:self.used])
        if scope.prefixes:
            of_entity = admitted_names(tuple(self.names), scope)[self.entity[:self.used]]
            inside = of_entity if inside is None else inside & of_entity
        if shards is not None:
            of_shard = np.isin(self.shard[:self.used], np.fromiter(shards, dtype=np.int32))
            inside = of_shard if inside is None else inside & of_shard
        return inside

    def due(self) -> bool:
        """Whether the dead are many enough to number the live again."""
        return self.dead > max(RENUMBER_AFTER, len(self.slot_of))

    def numbering(self) -> np.ndarray:
        """Each slot's number once the live are numbered again (old slot -> new, -1: dead)."""
        live = self.live[:self.used]
        return np.where(live, np.cumsum(live) - 1, -1)

    def renumber(self, numbering: np.ndarray) -> None:
        """Number the live slots again as `numbering` (what `numbering()` gave, nothing killed since),
        every column with them, and the names still used; tell `on_renumber`."""
        live = self.live[:self.used]
        used_names = np.unique(self.entity[:self.used][live])
        self.names = [self.names[i] for i in used_names.tolist()]
        self._name_of = {name: i for i, name in enumerate(self.names)}
        self.columns["entity"][:self.used][live] = np.searchsorted(used_names, self.entity[:self.used][live])
        self.used = int(np.count_nonzero(live))
        size = max(1024, self.used)
        for name, column in self.columns.items():
            self.columns[name] = _grown(column[:len(live)][live], size, self._fill[name])
        self.slot_of = {key(s, r): i for i, (s, r) in enumerate(zip(self.shard[:self.used].tolist(),
                                                                     self.rowid[:self.used].tolist()))}
        for tell in self.on_renumber:
            tell(numbering)

    def _name(self, entity_id: str) -> int:
        place = self._name_of.get(entity_id)
        if place is None:
            place = self._name_of[entity_id] = len(self.names)
            self.names.append(entity_id)
        return place

    def _reserve(self, more: int) -> None:
        if self.used + more <= len(self.live):
            return
        size = max(len(self.live) + len(self.live) // 2, self.used + more)
        for name, column in self.columns.items():
            self.columns[name] = _grown(column, size, self._fill[name])


def _grown(column: np.ndarray, size: int, fill: object) -> np.ndarray:
    """`column` in a larger array, `fill` past it."""
    out = np.full(size, fill, dtype=column.dtype)
    out[:len(column)] = column
    return out
