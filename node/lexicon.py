"""One full-text index over a node's shards: the lexical half of its node index (node/node_index.py).

A query without an entity used to run two FTS5 MATCH evaluations in every shard the node holds
(about 0.27 ms a shard whatever it finds, docs/benchmarks.md), so its cost grew with the shard
count. The lexicon holds the same two documents per memory as the shards' FTS tables (its text, and
its turn window: node/store/windows.py), in one in-memory SQLite database with one FTS5 table for
each, so a query that spans the node pays two MATCH evaluations. Row ids are
`shard << SHARD_BITS | rowid`. What a scope filters on (entity id, creation time) is in a narrow
table of its own, `rows`, joined by row id: read from the FTS tables' own content, those two
columns cost twice as much per matching row (docs/benchmarks.md, "Prefix-scoped queries"). BM25
is computed over the node's rows, not one shard's (the idf of a word is the node's), which is what
one index over the node means; the documents' lengths count the entity token as the shards' do,
so a node of one shard scores as that shard.
"""

from __future__ import annotations

import sqlite3
from typing import Iterable

from node.store.scope import Scope

SHARD_BITS = 40  # low bits of a lexicon rowid: the shard's own rowid
TABLES = ("turns", "windows")  # as the shards' memories_fts and windows_fts
_MASK = (1 << SHARD_BITS) - 1


def lexicon_rowid(shard: int, rowid: int) -> int:
    return shard << SHARD_BITS | rowid


class Lexicon:
    def __init__(self) -> None:
        self.db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.execute("CREATE TABLE rows(rowid INTEGER PRIMARY KEY, entity_id TEXT NOT NULL, "
                        "created_at_ms INTEGER NOT NULL)")
        for table in TABLES:  # the columns of the shards' tables
            self.db.execute(f"CREATE VIRTUAL TABLE {table} USING fts5(entity_token, text, "
                            f"tokenize='porter unicode61 remove_diacritics 2')")

    @property
    def nbytes(self) -> int:
        return self.db.execute("PRAGMA page_count").fetchone()[0] * self.db.execute("PRAGMA page_size").fetchone()[0]

    def insert(self, shard: int, memories: list, windows: list) -> None:
        """Add a shard's memories, (rowid, entity_id, created_at_ms, entity_token, text, ...) each, and
        their window documents, (rowid, entity_token, window text) each."""
        self.db.executemany("INSERT OR REPLACE INTO rows(rowid, entity_id, created_at_ms) VALUES (?, ?, ?)",
                            [(lexicon_rowid(shard, r[0]), r[1], r[2]) for r in memories])
        turns = [(lexicon_rowid(shard, r[0]), r[3], r[4]) for r in memories]
        for table, documents in zip(TABLES, (turns, [(lexicon_rowid(shard, r[0]), *r[1:3]) for r in windows])):
            self.db.executemany(f"INSERT INTO {table}(rowid, entity_token, text) VALUES (?, ?, ?)", documents)

    def delete(self, shard: int, rowids: list[int]) -> None:
        keys = [(lexicon_rowid(shard, r),) for r in rowids]
        for table in ("rows", *TABLES):
            self.db.executemany(f"DELETE FROM {table} WHERE rowid = ?", keys)

    def delete_shard(self, shard: int) -> None:
        for table in ("rows", *TABLES):
            self.db.execute(f"DELETE FROM {table} WHERE rowid BETWEEN ? AND ?",
                            (lexicon_rowid(shard, 0), lexicon_rowid(shard + 1, 0) - 1))

    def match(self, table: str, match: str, scope: Scope, shards: Iterable[int], every_shard: bool,
              limit: int) -> dict[tuple[int, int], float]:
        """Positive BM25 scores of the best `limit` rows of `table` in `shards` and `scope`, best first,
        keyed by (shard, rowid). `match`: an FTS5 expression over the text (node.ranking);
        `every_shard`: `shards` are all the lexicon holds (no filter on them needed)."""
        scope = scope.any_entity()
        where, args = scope.sql(alias="r")
        if not every_shard:
            wanted = sorted(shards)
            where += f" AND (t.rowid >> {SHARD_BITS}) IN ({','.join('?' * len(wanted))})"
            args = [*args, *wanted]
        joined = "" if scope.every_row else "JOIN rows r ON r.rowid = t.rowid"
        rows = self.db.execute(
            f"SELECT t.rowid, -bm25({table}, 0.0, 1.0) FROM {table} t {joined} WHERE {table} MATCH ? AND {where} "
            f"ORDER BY bm25({table}, 0.0, 1.0) LIMIT ?", (f"text : ({match})", *args, limit))
        return {(r >> SHARD_BITS, r & _MASK): max(0.0, float(v)) for r, v in rows}
