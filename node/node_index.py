"""A node's index over all the shards it holds, for queries that span them (no `entity_id`).

Three parts, each a job of its own: the lexicon (node/lexicon.py: both FTS documents of every
memory, as NumPy postings scored with FTS5's BM25), the node's vectors (node/node_vectors.py: 8-bit
codes scanned in one pass) and the rows scoring reads (node/node_rows.py: each memory's id, time,
kind, exact vector and whether it states a fact), over one numbering of the memories that all three
share (node/node_slots.py). This module keeps them current with the shards, without touching the
write path:
  - a shard is loaded whole the first time a spanning query reads it, and again whenever its
    `ShardStore` object changed (a copy that arrived, the half of a split, a restored snapshot: a
    new file means a new store);
  - from its loading on, TEMP triggers on the shard's connection note every row of `memories`
    inserted, deleted or changed (with its session and turn, whose neighbours' windows change too)
    in a TEMP table; before each spanning query those rows, and the windows of their session
    neighbours, are read again from the shard. A note is written in the same transaction as the
    write, so a write rolled back leaves none; triggers and notes die with the connection;
  - a shard no longer held here is dropped.
It is derived state, in memory only and never written to disk: an erase deletes the rows from it as
from the shard, and no file keeps a copy. It holds at most NODE_INDEX_ROWS memories (about 2.7 KiB
each at 384 dimensions, 1.6 of them the rows scoring reads: docs/ops/sizing.md); a node over that
searches shard by shard. All of this runs on the node's store thread, like every other SQLite
call, so no write interleaves.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from node.lexicon import Lexicon
from node.node_rows import CandidateRows
from node.node_slots import Slots
from node.node_vectors import NodeVectors
from node.store.schema import LEXICAL_SOURCES, rows_in
from node.store.scope import Scope
from node.store.search import STATES_A_FACT
from node.store.shard import ShardStore
from node.store.windows import session_neighbours

RELOAD_SHARE = 0.25  # more noted rows than this share of a shard (or 64): load it whole again

_NOTES = "node_index_notes"
_TRIGGERS = f"""
PRAGMA temp_store = MEMORY;  -- the notes (ids of rows written, of erased ones too) stay off the disk
CREATE TEMP TABLE IF NOT EXISTS {_NOTES} (rowid INTEGER, entity_id TEXT, session_id TEXT, turn_index INTEGER);
CREATE TEMP TRIGGER IF NOT EXISTS node_index_ai AFTER INSERT ON main.memories BEGIN
    INSERT INTO {_NOTES} VALUES (new.rowid, new.entity_id, new.session_id, new.turn_index);
END;
CREATE TEMP TRIGGER IF NOT EXISTS node_index_ad AFTER DELETE ON main.memories BEGIN
    INSERT INTO {_NOTES} VALUES (old.rowid, old.entity_id, old.session_id, old.turn_index);
END;
CREATE TEMP TRIGGER IF NOT EXISTS node_index_au
    AFTER UPDATE OF entity_id, entity_token, session_id, turn_index, created_at_ms, textual_content, vector
    ON main.memories BEGIN
    INSERT INTO {_NOTES} VALUES (old.rowid, old.entity_id, old.session_id, old.turn_index);
    INSERT INTO {_NOTES} VALUES (new.rowid, new.entity_id, new.session_id, new.turn_index);
END;
CREATE VIRTUAL TABLE IF NOT EXISTS temp.node_index_turn_words USING fts5vocab(main, memories_fts, instance);
CREATE VIRTUAL TABLE IF NOT EXISTS temp.node_index_window_words USING fts5vocab(main, windows_fts, instance);
"""
# A whole shard's words come from its own FTS5 tables (Lexicon.load), one vocabulary table each: the
# count of each word in each document's text, and each document's length in tokens (both columns).
_VOCABULARIES = ("node_index_turn_words", "node_index_window_words")
_WORDS = "SELECT term, doc, count(*) FROM temp.{vocab} WHERE col = '{column}' GROUP BY term, doc"
_LENGTHS = "SELECT doc, count(*) FROM temp.{vocab} GROUP BY doc"
# What the index reads from a shard: each memory's text, vector and what scoring reads (CANDIDATE_COLUMNS,
# `_candidate`), and its window document.
_MEMORIES = ("SELECT m.rowid, m.entity_id, m.created_at_ms, m.entity_token, m.textual_content, m.vector, m.memory_id, "
             f"m.kind, {STATES_A_FACT} FROM memories m")
_WINDOWS = "SELECT w.rowid, w.entity_token, w.window_text FROM windows_fts w JOIN memories m ON m.rowid = w.rowid"


class NodeIndex:
    def __init__(self, dimension: int) -> None:
        self.slots = Slots()  # every memory's row number in the three parts below
        self.lexicon = Lexicon(self.slots)
        self.vectors = NodeVectors(dimension)
        self.candidates = CandidateRows(self.slots, dimension)
        self.slots.on_renumber.append(self.vectors.renumber)
        self._loaded: dict[int, ShardStore] = {}  # shard -> the store its rows were read from
        self._seen: dict[int, int] = {}  # shard -> its connection's total_changes when last read
        self.loads = 0  # shards loaded whole
        self.refreshed = 0  # rows read again after a write

    @property
    def shards(self) -> set[int]:
        return set(self._loaded)

    def all_loaded(self, shards: AbstractSet[int]) -> bool:
        """Whether `shards` are every shard loaded here (a node's own spanning query): what holds
        only these needs no mask a shard."""
        return shards == self._loaded.keys()

    @property
    def rows(self) -> int:
        """Memories held: a live slot each."""
        return len(self.slots.slot_of)

    def memories(self, shard: int, scope: Scope | None = None) -> int:
        """How many memories a shard loaded here holds (current after `sync`), within `scope` if given."""
        seg = self.vectors.segments[shard]
        inside = None if scope is None else seg.admitted(scope)
        return len(seg.rowids) if inside is None else int(np.count_nonzero(inside))

    def in_scope(self, shards: AbstractSet[int], scope: Scope) -> int:
        """How many memories of `shards` (loaded here, current) `scope` admits: of all the slots when
        they are every shard loaded (a node's own query), no work a shard (0.1 ms at 128 shards)."""
        if not self.all_loaded(shards) or scope.entity_id is not None:
            return sum(self.memories(s, scope) for s in shards)
        inside = self.slots.admitted(scope, None)
        return self.rows if inside is None else int(np.count_nonzero(inside & self.slots.live[:self.slots.used]))

    def sync(self, wanted: dict[int, ShardStore], held: dict[int, ShardStore], max_rows: int,
             load_rows: int | None = None) -> bool:
        """Bring the shards of `wanted` (shard -> store) in, or up to date; drop the shards no longer
        `held` here, or held through another store. True when all of `wanted` are in and the index
        holds at most `max_rows` memories. Past 1.25 times that (its shards grew) it lets every
        shard go and loads again what fits. `load_rows`: load whole shards of at most about that
        many memories in all in this call (one at least), so that no query waits for a whole node
        to load: the next calls load the rest."""
        for shard in [s for s, store in self._loaded.items() if held.get(s) is not store]:
            self._drop(shard)
        if self.rows > max_rows * 1.25:
            for shard in list(self._loaded):
                self._drop(shard)
        complete, loaded = True, 0
        for shard, store in wanted.items():
            if shard in self._loaded:
                if store.db.total_changes != self._seen[shard]:
                    self._refresh(shard, store)
                continue
            rows = store.entity_count(None) if complete else 0
            if complete and self.rows + rows <= max_rows and (load_rows is None or not loaded or loaded + rows <= load_rows):
                self._load(shard, store)
                loaded += rows
            else:
                complete = False
        if loaded and complete:  # the last shards came in: what loading logged in the lexicon is merged
            self.lexicon.merge()
        return complete and self.rows <= max_rows

    def stats(self) -> dict[str, Any]:
        return {"memories": self.rows, "shards": len(self._loaded), "lexicon_mb": round(self.lexicon.nbytes / 2**20, 1),
                "vectors_mb": round(self.vectors.nbytes / 2**20, 1), "four_bit_memories": self.vectors.sealed_rows,
                "rows_mb": round(self.candidates.nbytes / 2**20, 1), "loads": self.loads,
                "rows_read_again": self.refreshed}

    def close(self) -> None:
        self.lexicon.tokenizer.db.close()
        self.vectors.close()

    def _load(self, shard: int, store: ShardStore) -> None:
        store.db.executescript(_TRIGGERS)
        store.db.execute(f"DELETE FROM temp.{_NOTES}")
        memories = store.db.execute(_MEMORIES).fetchall()
        slots = self.lexicon.load(shard, memories, [
            (store.db.execute(_WORDS.format(vocab=vocab, column=column)).fetchall(),
             store.db.execute(_LENGTHS.format(vocab=vocab)).fetchall())
            for vocab, (_, column) in zip(_VOCABULARIES, LEXICAL_SOURCES)])
        self.vectors.put(shard, [(r[0], r[1], r[2], r[5]) for r in memories], slots)
        self.candidates.put(slots, [_candidate(r) for r in memories])
        self._loaded[shard] = store
        self._seen[shard] = store.db.total_changes
        self.loads += 1

    def _drop(self, shard: int) -> None:
        self.lexicon.delete_shard(shard)  # its slots die, and with them its rows for scoring
        self.vectors.drop(shard)
        store = self._loaded.pop(shard)
        self._seen.pop(shard, None)
        try:
            store.db.execute(f"DELETE FROM temp.{_NOTES}")
        except sqlite3.ProgrammingError:  # a closed store: its triggers and notes went with its connection
            pass

    def _refresh(self, shard: int, store: ShardStore) -> None:
        """Read again the rows written since the last sync, and the windows their writes changed.
        Called for a shard whose connection changed rows since (`total_changes`: a statement each
        to look for notes cost 0.5 ms a query at 32 shards)."""
        db = store.db
        noted = db.execute(f"SELECT rowid, entity_id, session_id, turn_index FROM temp.{_NOTES}").fetchall()
        if noted:
            db.execute(f"DELETE FROM temp.{_NOTES}")
        self._seen[shard] = db.total_changes
        if not noted:
            return
        if len(noted) > max(64, RELOAD_SHARE * self.memories(shard)):
            self._drop(shard)
            self._load(shard, store)
            return
        changed = sorted({r[0] for r in noted})
        windows = set(changed)
        for entity, session, turn in {tuple(r[1:]) for r in noted}:
            windows.update(session_neighbours(db, store.ranking.window_radius, entity, session, turn))
        targets = sorted(windows)
        memories = _rows(db, _MEMORIES, "m.rowid", targets)
        self.lexicon.delete(shard, targets)
        slots = self.lexicon.insert(shard, memories, _rows(db, _WINDOWS, "w.rowid", targets))
        # Every row read again has a new slot (its window is new too): all of them move in the vectors.
        self.vectors.update(shard, targets, [(r[0], r[1], r[2], r[5]) for r in memories], slots)
        self.candidates.put(slots, [_candidate(r) for r in memories])
        self.refreshed += len(windows)


def _candidate(memory: Any) -> tuple:
    """A row of `_MEMORIES` as scoring reads it (node.store.search.CANDIDATE_COLUMNS)."""
    return memory[0], memory[6], memory[2], memory[7], memory[5], memory[8]


def _rows(db: sqlite3.Connection, sql: str, column: str, rowids: list[int]) -> list:
    return list(rows_in(db, f"{sql} WHERE {column} IN ({{marks}})", rowids))
