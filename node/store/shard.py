"""One shard: a SQLite file (the source of truth) and a Chroma collection (a derived vector index).

A shard lives in its own folder, `<data>/shards/<NNNN>/`, holding `store.sqlite3` and `chroma/`,
so placing, copying or backing up a shard is moving one folder.

Writes commit to SQLite (row, FTS5 entries, vector blob, relations) in one transaction with
`synchronous=FULL`, and the caller is answered then. The vector reaches Chroma later, in batches
(`index_pending()`, called by the node when a shard's backlog fills or writes pause): one Chroma
upsert costs about 7 ms plus 0.4 ms a vector here, so indexing one write at a time would cost more
than everything else a write does. Until then the row has `indexed = 0`, and searches score such
rows exactly from their stored vectors, so a write is searchable the moment it is acknowledged.
Rows a crash left unindexed are indexed by `reconcile()` at start-up; if the collection is lost or
disagrees with SQLite it is rebuilt from the stored vectors.

Not thread-safe: the owning node calls a shard from one thread at a time.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from node.facts import slots_of
from node.ids import entity_token
from node.measurements import extract
from node.ranking import RankingConfig
from node.store import analytics, changelog, erasure, graph, records, schema, snapshot
from node.store.fact_chains import drop_facts, rechain
from node.store.records import MemoryRecord
from node.store.scope import Window
from node.store.search import Search
from node.store.transaction import Transaction, upsert_together
from node.store.vector_index import VectorIndex
from node.store.windows import check_windows, rewrite_windows, window_targets
from node.vector_cache import VectorCache

log = logging.getLogger("tellodb.shard")



class ShardStore:
    def __init__(
        self,
        root: str | Path,
        shard_id: int,
        dimension: int,
        hnsw: dict[str, int] | None = None,
        ranking: RankingConfig | None = None,
        vector_cache: VectorCache | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.ranking = ranking or RankingConfig()
        self.vector_cache = vector_cache or VectorCache()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dimension = dimension
        self.hnsw = hnsw or {"connectivity": 16, "ef_search": 64, "ef_construction": 128}
        self.db = schema.connect(self.root / "store.sqlite3")
        schema.check_meta(self.db, shard_id, dimension, self.root)
        self.index = VectorIndex(self.root / "chroma", shard_id, self.db, self.hnsw)
        check_windows(self.db, self.ranking.window_radius)
        self.searcher = Search(self.db, self.index, self.ranking, self.vector_cache, shard_id, dimension)

    @property
    def exact_scan(self) -> int:
        """Scopes up to this many memories are searched exactly, without Chroma."""
        return self.searcher.exact_scan

    @exact_scan.setter
    def exact_scan(self, value: int) -> None:
        self.searcher.exact_scan = value

    @property
    def collection(self):
        return self.index.collection

    @property
    def unindexed(self) -> int:
        """Committed rows not in Chroma yet (an upper bound: `index_pending()` makes it exact)."""
        return self.index.unindexed

    @unindexed.setter
    def unindexed(self, value: int) -> None:
        self.index.unindexed = value

    # ---- set-up -------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        return schema.read_meta(self.db, key)

    def set_meta(self, key: str, value: str) -> None:
        with self._tx():
            schema.write_meta(self.db, key, value)

    def _tx(self) -> Transaction:
        return Transaction(self.db)

    def reconcile(self) -> int:
        """Bring Chroma in line with SQLite; return how many vectors were (re-)indexed."""
        return self.index.reconcile()

    def index_pending(self, limit: int | None = None) -> int:
        """Add committed rows that are not in Chroma yet (all, or at most `limit`); return how many."""
        return self.index.index_pending(limit)

    # ---- writes -------------------------------------------------------------------------------

    def upsert(self, records: Sequence[MemoryRecord]) -> None:
        """Store `records` atomically (all or none); Chroma gets them from `index_pending()`.
        Re-used ids are replaced."""
        upsert_together([(self, records)])

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
                windows |= window_targets(self.db, self.ranking.window_radius, [old["rowid"]])
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
                                 self.ranking.single_valued_predicates):
                self.db.execute("INSERT INTO facts (memory_id, entity_id, slot, valid_from_ms) VALUES (?, ?, ?, ?)",
                                (r.memory_id, r.entity_id, slot, r.created_at_ms))
                slots.add((r.entity_id, slot))
            self._count_entity(r.entity_id, +1)
            windows |= window_targets(self.db, self.ranking.window_radius, [rowid])
        rewrite_windows(self.db, self.ranking.window_radius, windows)
        rechain(self.db, slots)
        return len(unique)

    def _count_entity(self, entity_id: str, delta: int) -> None:
        """Every write of an entity's memories passes here: keep its count, drop its cached vectors."""
        self.vector_cache.drop(self.shard_id, entity_id)
        self.db.execute(
            "INSERT INTO entities(entity_id, memories) VALUES (?, ?) "
            "ON CONFLICT(entity_id) DO UPDATE SET memories = memories + excluded.memories",
            (entity_id, delta),
        )
        self.db.execute("DELETE FROM entities WHERE entity_id = ? AND memories <= 0", (entity_id,))

    def delete(self, memory_id: str) -> bool:
        """Remove a memory from SQLite, FTS, relations and Chroma. False when it is not here."""
        with self._tx():
            found = self._delete_row(memory_id)
        if found:
            self.index.delete([memory_id])
        return found

    def _delete_row(self, memory_id: str, seq: int | None = None) -> bool:
        """Delete a memory and what derives from it, and log it; in a transaction."""
        row = self.db.execute("SELECT rowid, entity_id FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
        if row is None:
            return False
        windows = window_targets(self.db, self.ranking.window_radius, [row["rowid"]])
        slots = drop_facts(self.db, memory_id)
        # Triggers take its FTS entry, window, relations and measurements with it.
        self.db.execute("DELETE FROM memories WHERE memory_id = ?", (memory_id,))
        rechain(self.db, slots)
        rewrite_windows(self.db, self.ranking.window_radius, windows)
        self._count_entity(row["entity_id"], -1)
        changelog.record(self.db, changelog.DELETE, memory_id, row["entity_id"], seq=seq)
        return True

    def nearest(self, entity_id: str, vector: np.ndarray, exclude: str) -> tuple[str, float] | None:
        """The entity's memory closest to `vector` (other than `exclude`) and its exact cosine."""
        return self.searcher.nearest(entity_id, vector, exclude)

    # ---- reads --------------------------------------------------------------------------------

    def get(self, memory_id: str) -> dict[str, Any] | None:
        return records.get(self.db, memory_id)

    def turn_window(self, memory_id: str, radius: int) -> list[dict[str, Any]]:
        return records.turn_window(self.db, memory_id, radius)

    def entity_count(self, entity_id: str | None) -> int:
        return records.entity_count(self.db, entity_id)

    def stats(self) -> dict[str, int]:
        one = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "memories": one("SELECT COUNT(*) FROM memories"),
            "entities": one("SELECT COUNT(*) FROM entities"),
            "facts_current": one("SELECT COUNT(*) FROM facts WHERE valid_to_ms IS NULL"),
            "facts_stale": one("SELECT COUNT(*) FROM facts WHERE valid_to_ms IS NOT NULL"),
            "edges": one("SELECT COUNT(*) FROM relations"),
            "edges_valid": one("SELECT COUNT(*) FROM relations WHERE valid"),
            "measurements": one("SELECT COUNT(*) FROM measurements"),
            "unindexed": one("SELECT COUNT(*) FROM memories WHERE indexed = 0"),
            "vectors": self.index.collection.count(),
        }

    def profile(self, entity_id: str, recent: int) -> dict[str, Any]:
        return records.profile(self.db, entity_id, recent)

    def search(self, query_vector: np.ndarray, query_text: str, entity_id: str | None, limit: int,
               window: Window = None) -> list[dict[str, Any]]:
        """The best `limit` memories (of `entity_id`, or of all entities here) for the query, created
        within `window` when one is given: exactly min(limit, memories in scope) hits, best first."""
        return self.searcher.search(query_vector, query_text, entity_id, limit, window)

    def in_window(self, entity_id: str | None, window: Window, limit: int) -> list[dict[str, Any]]:
        """Memories created within `window`, oldest first (a temporal query without text)."""
        return self.searcher.in_window(entity_id, window, limit)

    # ---- the knowledge graph -------------------------------------------------------------------

    def edges(self, entity_id: str | None, nodes: Sequence[str], direction: str, edge_types: Sequence[str] | None,
              per_node: int) -> list[dict[str, Any]]:
        return graph.edges(self.db, entity_id, nodes, direction, edge_types, per_node)

    # ---- analytics ----------------------------------------------------------------------------

    def analytics(self, entity_id: str, label: str, start_ms: int | None, end_ms: int | None,
                  bucket: str | None) -> dict[str, Any]:
        return analytics.analytics(self.db, entity_id, label, start_ms, end_ms, bucket)

    # ---- the right to be forgotten ------------------------------------------------------------

    def export_page(self, entity_id: str, after_rowid: int, limit: int) -> list[dict[str, Any]]:
        return erasure.export_page(self.db, entity_id, after_rowid, limit)

    def erase(self, entity_id: str) -> dict[str, int]:
        """Remove every trace of an entity: rows, FTS entries, windows, relations, counts, vectors.

        Deleted pages are zeroed (`secure_delete`), both FTS indexes are merged so no segment keeps
        the entity's tokens, the WAL is truncated, and the Chroma index is rebuilt from SQLite
        (HNSW files keep deleted vectors otherwise), so no file of the shard holds a copy.
        """
        with self._tx():
            counts = self._erase_rows(entity_id)
        if any(counts.values()):
            self._scrub()
        return counts

    def _erase_rows(self, entity_id: str, seq: int | None = None) -> dict[str, int]:
        """In a transaction: delete an entity's rows and earlier change-log entries, and log the erase."""
        self.vector_cache.drop(self.shard_id, entity_id)
        return erasure.erase_rows(self.db, entity_id, seq)

    def _scrub(self) -> None:
        erasure.scrub(self.db)
        self.rebuild_index()

    # ---- the change log: bringing copies of this shard up to date (node.changelog) --------------

    def last_seq(self) -> int:
        return changelog.last_seq(self.db)

    def changes_since(self, after: int, limit: int = 1000) -> list[changelog.Change]:
        return changelog.since(self.db, after, limit)

    def apply(self, changes: Sequence[changelog.Change]) -> int:
        """Replay another copy's changes onto this one, in one transaction; those at or below this
        copy's own last sequence number are skipped, so replay is idempotent. Returns how many applied."""
        from node import id_homes  # it builds on this module

        todo = [c for c in changes if c.seq > self.last_seq()]
        if not todo:
            return 0
        written, deleted, erased = 0, [], False
        with self._tx():
            for c in todo:
                if c.op == changelog.UPSERT:
                    b = json.loads(c.body)
                    record = MemoryRecord(
                        memory_id=c.key, entity_id=b["entity_id"], session_id=b["session_id"],
                        turn_index=b["turn_index"], created_at_ms=b["created_at_ms"], kind=b["kind"],
                        textual_content=b["textual_content"], relations=tuple(tuple(r) for r in b["relations"]),
                        vector=changelog.vector_of(c), metrics=tuple((m[0], m[1]) for m in b["metrics"]),
                        fact_key=b["fact_key"], ingested_at_ms=b["ingested_at_ms"])
                    written += self.stage([record], [c.seq])
                elif c.op == changelog.DELETE:
                    if self._delete_row(c.key, c.seq):
                        deleted.append(c.key)
                elif c.op == changelog.ERASE:
                    erased |= any(self._erase_rows(c.key, c.seq).values())
                elif c.op == changelog.HOME:
                    id_homes.set_row(self, c.key, id_homes.home_of(c), c.seq)
                elif c.op == changelog.UNHOME:
                    id_homes.drop_row(self, c.key, c.seq)
                else:
                    raise ValueError(f"change {c.seq}: unknown operation {c.op!r}")
        self.unindexed += written
        if deleted:
            self.index.delete(deleted)
        if erased:
            self._scrub()
        return len(todo)

    def trim_log(self, keep: int) -> int:
        with self._tx():
            return changelog.trim(self.db, keep)

    def snapshot(self, dest: str | Path) -> dict[str, Any]:
        return snapshot.snapshot(self.root / "store.sqlite3", self.shard_id, dest)

    def rebuild_index(self) -> int:
        """Drop the Chroma index and build it again from the vectors in SQLite."""
        return self.index.rebuild()

    def close(self) -> None:
        """Checkpoint the WAL into the main file and release SQLite and Chroma."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.db.close()
            self.index.close()

