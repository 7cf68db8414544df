"""A shard's vector index: a Chroma collection derived from the vectors in SQLite, written behind.

Writes commit to SQLite (row, FTS5 entries, vector blob, relations) in one transaction with
`synchronous=FULL`, and the caller is answered then. The vector reaches Chroma later, in batches
(`index_pending()`, called by the node when a shard's backlog fills or writes pause): one Chroma
upsert costs about 7 ms plus 0.4 ms a vector here, so indexing one write at a time would cost more
than everything else a write does. Until then the row has `indexed = 0`, and searches score such
rows exactly from their stored vectors, so a write is searchable the moment it is acknowledged.
Rows a crash left unindexed are indexed by `reconcile()` at start-up; if the collection is lost or
disagrees with SQLite it is rebuilt from the stored vectors.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from node.index_budget import IndexBudget, index_bytes
from node.store.scope import Scope
from node.store.transaction import Transaction
from node.tuning import CHROMA_BATCH

log = logging.getLogger("tellodb.shard")



class VectorIndex:
    """Opened on first use and closed again when the node's `IndexBudget` needs the memory
    (node/index_budget.py): `collection` opens it, `unload()` closes it."""

    def __init__(self, path: Path, shard_id: int, db: sqlite3.Connection, hnsw: dict[str, int],
                 dimension: int, budget: IndexBudget | None = None) -> None:
        self.path = path
        self.shard_id = shard_id
        self.db = db
        self.hnsw = hnsw
        self.dimension = dimension
        self.budget = budget or IndexBudget()
        self._chroma: Any = None
        self._collection: Any = None
        self.vectors = 0  # vectors in Chroma when last counted (while loaded)
        # Committed rows not in Chroma yet (an upper bound: `index_pending()` makes it exact).
        self.unindexed = self.db.execute("SELECT COUNT(*) FROM memories WHERE indexed = 0").fetchone()[0]

    @property
    def collection(self) -> Any:
        """The Chroma collection, opened now if it is not loaded; marks the index as in use."""
        if self._collection is None:
            started = time.perf_counter()
            self._open()
            self.vectors = self._collection.count()
            self.budget.loaded(self, time.perf_counter() - started)
        else:
            self.budget.used(self)
        return self._collection

    @property
    def is_loaded(self) -> bool:
        return self._collection is not None

    def memory_bytes(self) -> int:
        """Estimated memory of the loaded index (node/index_budget.py)."""
        return index_bytes(self.vectors, self.dimension) if self.is_loaded else 0

    def unload(self) -> None:
        """Close the Chroma client, so its HNSW graph leaves memory; `collection` opens it again."""
        if self._chroma is not None:
            self._chroma.close()
        self._chroma = self._collection = None

    def indexed_rows(self) -> int:
        """Vectors Chroma holds, without loading it: SQLite's rows marked indexed (reconcile() keeps
        the two equal)."""
        if self.is_loaded:
            return self.collection.count()
        return self.db.execute("SELECT COUNT(*) FROM memories WHERE indexed = 1").fetchone()[0]

    def _open(self) -> None:
        import chromadb
        from chromadb.config import Settings

        path = self.path
        self._chroma = None
        settings = Settings(anonymized_telemetry=False, allow_reset=False)
        try:
            self._chroma = chromadb.PersistentClient(path=str(path), settings=settings)
            self._collection = self._chroma.get_or_create_collection("memories", configuration=self._config())
        except Exception:
            # The index is derived data: set a broken one aside and rebuild it from SQLite.
            aside = path.with_name(f"chroma.broken-{int(time.time())}")
            log.exception("shard %d: Chroma index unreadable, moving it to %s and rebuilding", self.shard_id, aside)
            if getattr(self, "_chroma", None) is not None:
                self._chroma.close()
            shutil.move(str(path), str(aside))
            self._chroma = chromadb.PersistentClient(path=str(path), settings=settings)
            self._collection = self._chroma.get_or_create_collection("memories", configuration=self._config())
            with Transaction(self.db):
                self.db.execute("UPDATE memories SET indexed = 0")
            self.unindexed = self.db.execute("SELECT COUNT(*) FROM memories").fetchone()[0]

    def _config(self) -> dict[str, Any]:
        return {
            "hnsw": {
                "space": "cosine",
                "max_neighbors": self.hnsw["connectivity"],
                "ef_search": self.hnsw["ef_search"],
                "ef_construction": self.hnsw["ef_construction"],
            }
        }

    def reconcile(self) -> int:
        """Bring Chroma in line with SQLite; return how many vectors were (re-)indexed."""
        indexed_rows = self.db.execute("SELECT COUNT(*) FROM memories WHERE indexed = 1").fetchone()[0]
        if self.collection.count() != indexed_rows:
            # The index lost or kept something it should not have: diff ids and repair both ways.
            chroma_ids = set(self._all_ids())
            sqlite_ids = {r[0] for r in self.db.execute("SELECT memory_id FROM memories")}
            orphans = list(chroma_ids - sqlite_ids)
            for i in range(0, len(orphans), CHROMA_BATCH):
                self.collection.delete(ids=orphans[i : i + CHROMA_BATCH])
            missing = sqlite_ids - chroma_ids
            with Transaction(self.db):
                self.db.execute("UPDATE memories SET indexed = 1")
                self.db.executemany("UPDATE memories SET indexed = 0 WHERE memory_id = ?", [(m,) for m in missing])
        return self.index_pending()

    def index_pending(self, limit: int | None = None) -> int:
        """Add committed rows that are not in Chroma yet (all, or at most `limit`), CHROMA_BATCH at
        a time; return how many."""
        total = 0
        while limit is None or total < limit:
            take = CHROMA_BATCH if limit is None else min(CHROMA_BATCH, limit - total)
            rows = self.db.execute(
                "SELECT memory_id, entity_id, created_at_ms, vector FROM memories WHERE indexed = 0 LIMIT ?",
                (take,),
            ).fetchall()
            if not rows:
                self.unindexed = 0
                break
            ids = [r["memory_id"] for r in rows]
            vectors = np.stack([np.frombuffer(r["vector"], dtype=np.float32) for r in rows])
            self._index(ids, vectors, [r["entity_id"] for r in rows], [r["created_at_ms"] for r in rows])
            total += len(rows)
            self.unindexed = max(0, self.unindexed - len(rows))
        if total and self.budget.max_bytes:  # re-written rows replace vectors: count what is there
            self.vectors = self.collection.count()
            self.budget.used(self)  # it grew: make room
        else:
            self.vectors += total  # an upper bound (a re-written row replaces its vector) until the next count
        return total

    def rebuild(self) -> int:
        """Drop the Chroma index and build it again from the vectors in SQLite."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        with Transaction(self.db):
            self.db.execute("UPDATE memories SET indexed = 0")
        return self.reconcile()

    def _all_ids(self) -> Iterable[str]:
        offset, page = 0, 5000
        while True:
            got = self.collection.get(include=[], limit=page, offset=offset)["ids"]
            yield from got
            if len(got) < page:
                return
            offset += page

    def _index(self, ids: list[str], vectors: np.ndarray, entities: list[str], created: list[int]) -> None:
        self.collection.upsert(
            ids=ids,
            embeddings=vectors,
            metadatas=[{"entity_id": e, "created_at_ms": int(c)} for e, c in zip(entities, created)],
        )
        with Transaction(self.db):
            self.db.executemany("UPDATE memories SET indexed = 1 WHERE memory_id = ?", [(i,) for i in ids])

    def candidates(self, vector: np.ndarray, n: int, scope: Scope) -> list[str]:
        """Ids that may be among the `n` memories in `scope` nearest to `vector`: Chroma's answer,
        and the committed rows it does not have yet. Chroma may still hold an older copy of a row
        (see `index_pending`), so the caller checks each row's scope and scores it exactly."""
        ids = self.collection.query(query_embeddings=np.asarray(vector, dtype=np.float32).reshape(1, -1),
                                    n_results=n + self._stale_slack(), where=scope.chroma_where(),
                                    include=[])["ids"][0]
        return ids + self._unindexed_ids(scope)

    def _stale_slack(self) -> int:
        """Extra results to ask Chroma for: each row re-written since it was indexed may hold a slot
        with its stale copy (dropped by the scope check), and there are at most `unindexed` such."""
        return min(self.unindexed, CHROMA_BATCH)

    def _unindexed_ids(self, scope: Scope) -> list[str]:
        """Ids of committed rows in scope that Chroma does not have yet: they are scored exactly."""
        if not self.unindexed:
            return []
        where, args = scope.sql()
        return [r[0] for r in self.db.execute(
            f"SELECT m.memory_id FROM memories AS m INDEXED BY memories_unindexed WHERE m.indexed = 0 AND {where}",
            args)]

    def delete(self, ids: list[str]) -> None:
        self.collection.delete(ids=ids)

    def close(self) -> None:
        self.unload()
        self.budget.closed(self)
