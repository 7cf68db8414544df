"""Writes to a shard: a memory and everything derived from it, in the caller's transaction.

A write stores the row (text, vector, `indexed = 0`) and recomputes what derives from it in the same
transaction: FTS entries (triggers), lexical windows of its neighbours, relations, measurements,
fact chains, the entity's count and its cached vectors; and it appends its change-log entry.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Sequence

import numpy as np

from node.facts import slots_of
from node.ids import entity_token
from node.measurements import extract
from node.ranking import RankingConfig
import node.store.changelog as changelog
from node.store.erasure import erase_rows
from node.store.fact_chains import drop_facts, rechain
from node.store.records import MemoryRecord
from node.store.windows import rewrite_windows, window_targets
from node.vector_cache import VectorCache


class Writes:
    def __init__(self, db: sqlite3.Connection, dimension: int, ranking: RankingConfig, vector_cache: VectorCache,
                 shard_id: int) -> None:
        self.db = db
        self.dimension = dimension
        self.radius = ranking.window_radius
        self.single_valued = ranking.single_valued_predicates
        self.vector_cache = vector_cache
        self.shard_id = shard_id

    def stage(self, records: Sequence[MemoryRecord], seqs: Sequence[int] | None = None) -> int:
        """Write `records` inside the caller's open transaction, each with its change-log entry
        (with the sequence numbers `seqs` when applying another copy's log); return how many rows
        it wrote (`upsert_together` commits, and counts them as unindexed then)."""
        if not records:
            return 0
        now = int(time.time() * 1000)
        # Within one call the last record of an id wins, as if they had been sent one by one.
        last = {r.memory_id: i for i, r in enumerate(records)}
        unique = [records[i] for i in sorted(last.values())]
        unique_seqs = [None] * len(unique) if seqs is None else [seqs[i] for i in sorted(last.values())]
        windows: set[int] = set()  # rows whose window documents change
        slots: set[tuple[str, str]] = set()  # (entity, slot) whose validity chain changes
        for r, seq in zip(unique, unique_seqs):
            ingested = r.ingested_at_ms if r.ingested_at_ms is not None else now
            old = self.db.execute("SELECT rowid, entity_id FROM memories WHERE memory_id = ?",
                                  (r.memory_id,)).fetchone()
            if old is not None:
                self._count_entity(old["entity_id"], -1)
                self.db.execute("DELETE FROM relations WHERE memory_id = ?", (r.memory_id,))
                self.db.execute("DELETE FROM measurements WHERE memory_id = ?", (r.memory_id,))
                slots.update(drop_facts(self.db, r.memory_id))
                # Its old neighbours lose it from their windows (it may change session or turn).
                windows |= window_targets(self.db, self.radius, [old["rowid"]])
            vector = np.asarray(r.vector, dtype=np.float32)
            if vector.shape != (self.dimension,):
                raise ValueError(f"vector of shape {vector.shape}, expected ({self.dimension},)")
            rowid = self.db.execute(
                """
                INSERT INTO memories (memory_id, entity_id, entity_token, session_id, turn_index,
                    created_at_ms, ingested_at_ms, kind, textual_content, relations, vector, indexed)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
                ON CONFLICT(memory_id) DO UPDATE SET
                    entity_id = excluded.entity_id, entity_token = excluded.entity_token,
                    session_id = excluded.session_id, turn_index = excluded.turn_index,
                    created_at_ms = excluded.created_at_ms, ingested_at_ms = excluded.ingested_at_ms,
                    kind = excluded.kind, textual_content = excluded.textual_content,
                    relations = excluded.relations, vector = excluded.vector, indexed = 0
                RETURNING rowid
                """,
                (r.memory_id, r.entity_id, entity_token(r.entity_id), r.session_id, r.turn_index,
                 r.created_at_ms, ingested, r.kind, r.textual_content, json.dumps([list(t) for t in r.relations]),
                 vector.tobytes()),
            ).fetchone()[0]
            changelog.record(self.db, changelog.UPSERT, r.memory_id, r.entity_id, changelog.upsert_body(r, ingested),
                             vector.tobytes(), seq)
            self.db.executemany(
                "INSERT INTO relations (memory_id, entity_id, subject, predicate, object, timestamp_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(r.memory_id, r.entity_id, s, p, o, r.created_at_ms) for s, p, o in r.relations],
            )
            measured = [(label, value, None) for label, value in r.metrics]
            measured += [(m.label, m.value, m.unit) for m in extract(r.textual_content)]
            self.db.executemany(
                "INSERT INTO measurements (memory_id, entity_id, label, value, unit, timestamp_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(r.memory_id, r.entity_id, label, value, unit, r.created_at_ms) for label, value, unit in measured],
            )
            for slot in slots_of(r.entity_id, r.textual_content, r.relations, r.fact_key,
                                 self.single_valued):
                self.db.execute("INSERT INTO facts (memory_id, entity_id, slot, valid_from_ms) VALUES (?, ?, ?, ?)",
                                (r.memory_id, r.entity_id, slot, r.created_at_ms))
                slots.add((r.entity_id, slot))
            self._count_entity(r.entity_id, +1)
            windows |= window_targets(self.db, self.radius, [rowid])
        rewrite_windows(self.db, self.radius, windows)
        rechain(self.db, slots)
        return len(unique)

    def delete(self, memory_id: str, seq: int | None = None) -> bool:
        """Delete a memory and what derives from it, and log it; in a transaction."""
        row = self.db.execute("SELECT rowid, entity_id FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
        if row is None:
            return False
        windows = window_targets(self.db, self.radius, [row["rowid"]])
        slots = drop_facts(self.db, memory_id)
        # Triggers take its FTS entry, window, relations and measurements with it.
        self.db.execute("DELETE FROM memories WHERE memory_id = ?", (memory_id,))
        rechain(self.db, slots)
        rewrite_windows(self.db, self.radius, windows)
        self._count_entity(row["entity_id"], -1)
        changelog.record(self.db, changelog.DELETE, memory_id, row["entity_id"], seq=seq)
        return True

    def erase(self, entity_id: str, seq: int | None = None) -> dict[str, int]:
        """Delete an entity's rows and its earlier change-log entries, and log the erase; in a transaction."""
        self.vector_cache.drop(self.shard_id, entity_id)
        return erase_rows(self.db, entity_id, seq)

    def _count_entity(self, entity_id: str, delta: int) -> None:
        """Every write of an entity's memories passes here: keep its count, drop its cached vectors."""
        self.vector_cache.drop(self.shard_id, entity_id)
        self.db.execute(
            "INSERT INTO entities(entity_id, memories) VALUES (?, ?) "
            "ON CONFLICT(entity_id) DO UPDATE SET memories = memories + excluded.memories",
            (entity_id, delta),
        )
        self.db.execute("DELETE FROM entities WHERE entity_id = ? AND memories <= 0", (entity_id,))
