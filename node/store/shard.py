"""The shard store: one object over the package's parts, with the methods the node calls.

A shard lives in its own folder, `<data>/shards/<NNNN>/`, holding `store.sqlite3` (the source of
truth, node/store/schema.py) and `chroma/` (a derived vector index, node/store/vector_index.py), so
placing, copying or backing up a shard is moving one folder. `ShardStore` wires the parts together
on one SQLite connection and keeps transactions and the change log at its level: each method is
one unit of work the node asks for.

Not thread-safe: the owning node calls a shard from one thread at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from node.index_budget import IndexBudget
from node.ranking import RankingConfig
import node.store.analytics as analytics
import node.store.changelog as changelog
import node.store.erasure as erasure
import node.store.graph as graph
import node.store.records as records
import node.store.schema as schema
import node.store.snapshot as snapshot
from node.store.records import MemoryRecord
from node.store.scope import Window
from node.store.search import Search
from node.store.transaction import Transaction, upsert_together
from node.store.vector_index import VectorIndex
from node.store.windows import check_windows
from node.store.writes import Writes
from node.vector_cache import VectorCache


def _forward(part: str, name: str, doc: str) -> property:
    """An attribute of the store that lives on one of its parts (read and written there)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class ShardStore:
    def __init__(
        self,
        root: str | Path,
        shard_id: int,
        dimension: int,
        hnsw: dict[str, int] | None = None,
        ranking: RankingConfig | None = None,
        vector_cache: VectorCache | None = None,
        index_budget: IndexBudget | None = None,
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
        self.index = VectorIndex(self.root / "chroma", shard_id, self.db, self.hnsw, dimension, index_budget)
        check_windows(self.db, self.ranking.window_radius)
        self.writes = Writes(self.db, dimension, self.ranking, self.vector_cache, shard_id)
        self.searcher = Search(self.db, self.index, self.ranking, self.vector_cache, shard_id, dimension)

    exact_scan = _forward("searcher", "exact_scan", "Scopes up to this many memories are searched exactly.")
    shard_exact_scan = _forward("searcher", "shard_exact_scan", "A whole shard up to this many is searched exactly.")
    unindexed = _forward("index", "unindexed", "Committed rows not in Chroma yet (an upper bound).")
    collection = _forward("index", "collection", "The Chroma collection.")

    # ---- set-up and the vector index ----------------------------------------------------------

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
        """Write `records` inside the caller's open transaction (see `Writes.stage`); return how many rows."""
        return self.writes.stage(records, seqs)

    def delete(self, memory_id: str) -> bool:
        """Remove a memory from SQLite, FTS, relations and Chroma. False when it is not here."""
        with self._tx():
            found = self._delete_row(memory_id)
        if found:
            self.index.delete([memory_id])
        return found

    def _delete_row(self, memory_id: str, seq: int | None = None) -> bool:
        return self.writes.delete(memory_id, seq)

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
            "vectors": self.index.indexed_rows(),
            "bytes": self.size_bytes(),
            "seq": self.last_seq(),
        }

    def size_bytes(self) -> int:
        """The shard's size on disk: SQLite file, WAL and the Chroma folder."""
        total = 0
        for path in self.root.rglob("*"):
            try:
                total += path.stat().st_size if path.is_file() else 0
            except OSError:  # Chroma replaced a file meanwhile
                pass
        return total

    def profile(self, entity_id: str, recent: int) -> dict[str, Any]:
        return records.profile(self.db, entity_id, recent)

    def search(self, query_vector: np.ndarray, query_text: str, entity_id: str | None, limit: int,
               window: Window = None, prefixes: tuple[str, ...] | None = None, of_shards: int = 1,
               stages: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """The best `limit` memories (of `entity_id`, or of all entities here, or of those whose ids
        start with one of `prefixes`) for the query, created within `window` when one is given:
        exactly min(limit, memories in scope) hits, best first (`of_shards`, `stages`: node/store/search.py)."""
        return self.searcher.search(query_vector, query_text, entity_id, limit, window, prefixes, of_shards, stages)

    def in_window(self, entity_id: str | None, window: Window, limit: int,
                  prefixes: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Memories created within `window`, oldest first (a temporal query without text)."""
        return self.searcher.in_window(entity_id, window, limit, prefixes)

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
        """Remove every trace of an entity: rows, FTS entries, windows, relations, counts, vectors,
        log entries; no file of the shard keeps a copy (node/store/erasure.py)."""
        with self._tx():
            counts = self._erase_rows(entity_id)
        if any(counts.values()):
            self._scrub()
        return counts

    def _erase_rows(self, entity_id: str, seq: int | None = None) -> dict[str, int]:
        return self.writes.erase(entity_id, seq)

    def _scrub(self) -> None:
        erasure.scrub(self.db)
        self.rebuild_index()

    # ---- the change log: bringing copies of this shard up to date (node/store/changelog.py) ----

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
                    written += self.stage([changelog.record_of(c)], [c.seq])
                elif c.op == changelog.DELETE:
                    if self._delete_row(c.key, c.seq):
                        deleted.append(c.key)
                elif c.op == changelog.ERASE:
                    erased |= any(self._erase_rows(c.key, c.seq).values())
                elif c.op == changelog.HOME:
                    id_homes.set_row(self, c.key, id_homes.home_of(c), c.seq)
                elif c.op == changelog.UNHOME:
                    id_homes.drop_row(self, c.key, c.seq)
                elif c.op == changelog.FORGET:
                    id_homes.forget_row(self, c.key, c.seq)
                else:
                    raise ValueError(f"change {c.seq}: unknown operation {c.op!r}")
        self.unindexed += written
        if deleted:
            self.index.delete(deleted)
        if erased:
            self._scrub()
        return len(todo)

    def copy_state(self) -> tuple[int, str | None]:
        """(last seq, digest of the change at it or None when the log no longer has it): what a
        primary compares with its own log before it brings this copy up to date."""
        seq = self.last_seq()
        return seq, self.digest_at(seq)

    def digest_at(self, seq: int) -> str | None:
        change = changelog.change_at(self.db, seq)
        return None if change is None else changelog.digest(change)

    def trimmed_to(self) -> int:
        """The newest sequence number trimming dropped: replay from before it is impossible."""
        return changelog.trimmed_to(self.db)

    def advance_seq(self, seq: int) -> None:
        """Number this copy's next changes after `seq` (that of the copy it was brought up to)."""
        with self._tx():
            changelog.advance(self.db, seq)

    def pin_log(self, name: str, seq: int | None) -> None:
        """Keep the changes after `seq` for reader `name` (None: release its pin)."""
        with self._tx():
            changelog.pin(self.db, name, seq)

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

