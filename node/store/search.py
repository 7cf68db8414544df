"""Search in one shard: hybrid dense + lexical candidates, each scored exactly on every signal.

Dense candidates come from an exact scan of small scopes (an entity's cached vectors) or from the
vector index; lexical candidates from BM25 over both FTS5 tables (memories and their windows).
Every candidate is then scored on cosine, both BM25s and recency (node/ranking.py), adjusted by the
validity of the facts it states (node/store/fact_chains.py), and the best are returned in full.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import numpy as np

from node.facts import asked_predicates, asks_about_the_past
from node.ids import entity_token
from node.ranking import Candidate, RankingConfig, decays, fts_match_expression, fuse, lexical_score
from node.store.fact_chains import apply_validity
from node.store.records import MEMORY_COLUMNS, entity_count, row_to_memory
from node.store.schema import LEXICAL_SOURCES, rows_in
from node.store.scope import Scope, Window
from node.store.vector_index import VectorIndex
from node.tuning import EXACT_SCAN, LEXICAL_SCAN, SHARD_EXACT_SCAN
from node.vector_cache import WHOLE_SHARD, EntityVectors, VectorCache

# Whether memory `m` states a fact (fact validity reads its shard only when a candidate does).
STATES_A_FACT = "EXISTS (SELECT 1 FROM facts f WHERE f.memory_id = m.memory_id)"
# A candidate's row as scoring reads it: (rowid, memory_id, created_at_ms, kind, vector, whether it states a fact).
CANDIDATE_COLUMNS = f"m.rowid, m.memory_id, m.created_at_ms, m.kind, m.vector, {STATES_A_FACT}"


def score_candidates(rows: list[tuple], query_vector: np.ndarray, turn: np.ndarray, window: np.ndarray,
                     max_turn: float, max_window: float, as_of: int | None, config: RankingConfig) -> list[Candidate]:
    """Candidates (rows of CANDIDATE_COLUMNS) scored on every signal in one pass, before fact
    validity (`fused_scores`)."""
    if not rows:
        return []
    vectors = np.frombuffer(b"".join(r[4] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    scores = fused_scores(vectors, np.array([r[2] for r in rows], dtype=np.int64), [r[3] for r in rows],
                          query_vector, turn, window, max_turn, max_window, as_of, config)
    return [Candidate(score, r[2], r[1], r[0]) for r, score in zip(rows, scores.tolist())]


def fused_scores(vectors: np.ndarray, created_at_ms: np.ndarray, kinds, query_vector: np.ndarray, turn: np.ndarray,
                 window: np.ndarray, max_turn: float, max_window: float, as_of: int | None,
                 config: RankingConfig) -> np.ndarray:
    """Candidates' scores from their exact vectors, times and kinds: cosine, both BM25s (`turn`,
    `window`: each one's, 0 when it did not match) normalised by their best, recency as of `as_of`
    (default: now)."""
    cosines = vectors @ np.asarray(query_vector, dtype=np.float32)
    now = as_of if as_of is not None else int(time.time() * 1000)
    scores = fuse(cosines.astype(np.float64), lexical_score(turn, max_turn, window, max_window, config), config)
    return scores * decays(now - created_at_ms, kinds, config)


class Stopwatch:
    """Adds the seconds since its last lap to a stage of `stages` (the x-tm-* headers' stages:
    router/timing.py); with `stages=None` it measures nothing."""

    __slots__ = ("stages", "last")

    def __init__(self, stages: dict[str, float] | None) -> None:
        self.stages = stages
        self.last = time.perf_counter() if stages is not None else 0.0

    def lap(self, stage: str) -> None:
        if self.stages is not None:
            now = time.perf_counter()
            self.stages[stage] = self.stages.get(stage, 0.0) + now - self.last
            self.last = now


class Search:
    def __init__(self, db: sqlite3.Connection, index: VectorIndex, ranking: RankingConfig, vector_cache: VectorCache,
                 shard_id: int, dimension: int) -> None:
        self.db = db
        self.index = index
        self.ranking = ranking
        self.vector_cache = vector_cache
        self.shard_id = shard_id
        self.dimension = dimension
        self.exact_scan = EXACT_SCAN
        self.shard_exact_scan = SHARD_EXACT_SCAN

    def nearest(self, entity_id: str, vector: np.ndarray, exclude: str) -> tuple[str, float] | None:
        """The entity's memory closest to `vector` (other than `exclude`) and its exact cosine."""
        n = min(4, entity_count(self.db, entity_id))
        if n == 0:
            return None
        scope = Scope(entity_id)
        ids = [i for i in self.index.candidates(vector, n, scope) if i != exclude]
        if not ids:
            return None
        rows = self.db.execute(f"SELECT memory_id, vector, entity_id, created_at_ms FROM memories WHERE memory_id IN "
                               f"({','.join('?' * len(ids))})", ids).fetchall()
        scored = [(r[0], float(np.frombuffer(r[1], dtype=np.float32) @ vector))
                  for r in rows if scope.admits(r[2], r[3])]
        return max(scored, key=lambda x: x[1], default=None)

    def search(self, query_vector: np.ndarray, query_text: str, entity_id: str | None, limit: int,
               window: Window = None, prefixes: tuple[str, ...] | None = None, of_shards: int = 1,
               stages: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """The best `limit` memories (of `entity_id`, or of all entities here) for the query,
        created within `window` (start_ms, end_ms; either end may be None) when one is given.

        Returns exactly min(limit, memories in scope) hits, best first. `of_shards`: this shard is
        one of that many searched for the same query, whose hits are merged; each retriever then
        proposes its share of the candidate pool (at least `limit`), not the whole pool, so the
        merged query scores about as many candidates as a query of one shard. `stages`: seconds
        spent per stage are added to it (`Stopwatch`).
        """
        clock = Stopwatch(stages)
        scope = Scope.of(entity_id, window, prefixes)
        where, args = scope.sql()
        in_scope = (entity_count(self.db, entity_id) if scope.every_row else
                    self.db.execute(f"SELECT COUNT(*) FROM memories m WHERE {where}", args).fetchone()[0])
        want = min(limit, in_scope)
        if want == 0:
            return []
        pool = max(limit, -(-self.ranking.candidate_pool // max(1, of_shards)))
        clock.lap("storage")
        candidates = set(self.dense(query_vector, scope, in_scope, pool)[0].tolist())
        clock.lap("ann")

        # Lexical candidates from both FTS5 tables: the best `pool` of each. The scores of the
        # best LEXICAL_SCAN matches are kept, so every candidate is scored exactly on both.
        match = fts_match_expression(query_text)
        lexical: list[dict[int, float]] = []
        if match is not None:
            for table, column in LEXICAL_SOURCES:
                scores = self._bm25(table, column, match, scope, max(pool, LEXICAL_SCAN))
                lexical.append(scores)
                candidates.update(list(scores)[:pool])
        clock.lap("fts")

        # Safety net: if the index missed some (filtered HNSW search can), score the rest exactly.
        if len(candidates) < want:
            candidates.update(r[0] for r in self.db.execute(f"SELECT rowid FROM memories m WHERE {where}", args))

        # Facts compete with the other values of their slot: bring those in too.
        if entity_id is not None and candidates:
            candidates.update(self._slot_mates(entity_id, candidates, scope))

        turn, window_bm25 = lexical if lexical else ({}, {})
        clock.lap("storage")
        scored = self.scored(sorted(candidates), query_vector, turn, window_bm25,
                             max(turn.values(), default=0.0), max(window_bm25.values(), default=0.0),
                             scope.end_ms, asks_about_the_past(query_text), asked_predicates(query_text))
        scored.sort(key=Candidate.rank_key)
        clock.lap("fuse")
        hits = self.hydrate(scored[:want])
        clock.lap("hydrate")
        return hits

    def dense(self, query_vector: np.ndarray, scope: Scope, in_scope: int, pool: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rowids of the `pool` memories in scope nearest to the query vector, and their cosines
        when they were scanned exactly (None when the vector index proposed them).

        A scope of at most EXACT_SCAN memories (most entities) is scanned exactly from the vectors
        in SQLite: 1.2 ms for 1,000 here, against 3.5 ms for Chroma's filtered HNSW search, and
        exact. So is a whole shard (a query without an entity, maybe within a window) of at most
        SHARD_EXACT_SCAN, from its matrix in the node's vector cache: one product, no SQLite.
        Larger scopes ask Chroma's HNSW index.
        """
        q = np.asarray(query_vector, dtype=np.float32)
        whole_shard = (scope.entity_id is None and not scope.prefixes
                       and self._may_cache_shard(in_scope if scope.every_row else None))
        if in_scope <= self.exact_scan or whole_shard:
            if scope.entity_id is not None or whole_shard:
                vectors = self._entity_vectors(WHOLE_SHARD if whole_shard else scope.entity_id)
                rowids, matrix = vectors.rowids, vectors.matrix
                if not scope.timeless:
                    keep = scope.mask(vectors.created_at_ms)
                    rowids, matrix = rowids[keep], matrix[keep]
            else:
                where, args = scope.sql()
                rows = self.db.execute(f"SELECT m.rowid, m.vector FROM memories m WHERE {where}", args).fetchall()
                rowids = np.array([r[0] for r in rows], dtype=np.int64)
                matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            if len(rowids) == 0:
                return rowids, np.zeros(0, dtype=np.float32)
            cosines = matrix @ q
            k = min(pool, len(rowids))
            best = np.argpartition(-cosines, k - 1)[:k]
            return rowids[best], cosines[best]
        ids = self.index.candidates(q, min(pool, in_scope), scope)
        # Chroma may still hold an older copy of a row (see index_pending): keep only rows in scope.
        # (Filtered here, not in SQL: with the scope in the WHERE clause SQLite scans the entity.)
        found = {rowid for rowid, entity, created in rows_in(
            self.db, "SELECT rowid, entity_id, created_at_ms FROM memories WHERE memory_id IN ({marks})", ids)
            if scope.admits(entity, created)}
        return np.array(sorted(found), dtype=np.int64), None

    def _may_cache_shard(self, rows: int | None = None) -> bool:
        """Whether this shard's matrix is in the node's vector cache, or small enough to scan and
        may come in (SHARD_EXACT_SCAN rows, and room: VectorCache.room_for_shard). `rows`: the
        shard's row count when the caller has it already (`search`'s count of an every-row scope)."""
        if (self.shard_id, WHOLE_SHARD) in self.vector_cache:
            return True
        if rows is None:
            rows = entity_count(self.db, None)
        return rows <= self.shard_exact_scan and self.vector_cache.room_for_shard(rows * (self.dimension * 4 + 16))

    def _entity_vectors(self, entity_id: str | None) -> EntityVectors:
        """All of an entity's vectors (WHOLE_SHARD: all the shard's), from the node's cache or loaded into it."""
        cached = self.vector_cache.get(self.shard_id, entity_id)
        if cached is not None:
            return cached
        rows = self.db.execute("SELECT rowid, created_at_ms, vector FROM memories" +
                               ("" if entity_id is WHOLE_SHARD else " WHERE entity_id = ?"),
                               () if entity_id is WHOLE_SHARD else (entity_id,)).fetchall()
        # A copy, not a view of the joined bytes: numpy aligns its own arrays, and products over an
        # aligned matrix are faster (docs/benchmarks.md, "A node index").
        entry = EntityVectors(
            np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64),
            np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), self.dimension).copy())
        self.vector_cache.put(self.shard_id, entity_id, entry)
        return entry

    def _slot_mates(self, entity_id: str, rowids: set[int], scope: Scope) -> set[int]:
        """Rowids of the memories (in scope) that state a fact for a slot one of `rowids` states."""
        where, args = scope.sql()
        return {r[0] for r in rows_in(
            self.db, f"SELECT DISTINCT m.rowid FROM facts f JOIN memories m ON m.memory_id = f.memory_id "
                     f"WHERE f.entity_id = ? AND {where} AND f.slot IN (SELECT f2.slot FROM facts f2 JOIN memories m2 "
                     f"ON m2.memory_id = f2.memory_id WHERE m2.rowid IN ({{marks}})) LIMIT 1000",
            sorted(rowids), (entity_id, *args))}

    def _bm25(self, table: str, column: str, match: str, scope: Scope, limit: int) -> dict[int, float]:
        """Positive BM25 scores (higher is better) of the best `limit` rows, best first."""
        expr = f"{column} : ({match})"
        if scope.entity_id is not None:  # the entity filter goes through the full-text index as a token
            expr = f'entity_token : "{entity_token(scope.entity_id)}" AND {expr}'
        if scope.every_row:
            sql = (f"SELECT rowid, -bm25({table}, 0.0, 1.0) FROM {table} WHERE {table} MATCH ? "
                   f"ORDER BY bm25({table}, 0.0, 1.0) LIMIT ?")
            return {r: max(0.0, float(v)) for r, v in self.db.execute(sql, (expr, limit))}
        where, args = scope.any_entity().sql()
        sql = (f"SELECT f.rowid, -bm25({table}, 0.0, 1.0) FROM {table} f JOIN memories m ON m.rowid = f.rowid "
               f"WHERE {table} MATCH ? AND {where} ORDER BY bm25({table}, 0.0, 1.0) LIMIT ?")
        return {r: max(0.0, float(v)) for r, v in self.db.execute(sql, (expr, *args, limit))}

    def in_window(self, entity_id: str | None, window: Window, limit: int,
                  prefixes: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Memories created within `window`, oldest first (a temporal query without text)."""
        where, args = Scope.of(entity_id, window, prefixes).sql()
        rows = self.db.execute(f"SELECT {MEMORY_COLUMNS} FROM memories m WHERE {where} "
                               "ORDER BY created_at_ms, memory_id LIMIT ?", (*args, limit)).fetchall()
        return [dict(row_to_memory(r), similarity=1.0) for r in rows]

    def scored(self, rowids: list[int], query_vector: np.ndarray, turn: dict[int, float], window: dict[int, float],
               max_turn: float, max_window: float, as_of: int | None = None, past: bool = False,
               asked: set[str] = frozenset()) -> list[Candidate]:
        """Every candidate scored on all signals, fact validity and recency applied (unsorted).

        `turn` and `window`: BM25 of the candidates that matched, normalised by `max_turn` and
        `max_window` (the best of the search: this shard's, or a node's over all its shards). A
        fact superseded by `as_of` (default: now) is stale. Stale facts score `stale_factor` times
        their match and the current fact of a slot ranks above every other fact of it; a question
        about the past (`node.facts.PAST`) turns this round: the latest former value ranks first.
        When the question asks for a slot's predicate (`node.facts.asked_predicates`), that fact
        ranks first of all.
        """
        rows = self.candidate_rows(rowids)
        lexical = [np.array([scores.get(r[0], 0.0) for r in rows], dtype=np.float64) for scores in (turn, window)]
        scored = score_candidates(rows, query_vector, *lexical, max_turn, max_window, as_of, self.ranking)
        self.apply_validity(rows, scored, as_of, past, asked)
        return scored

    def candidate_rows(self, rowids: list[int]) -> list[tuple]:
        """What `score_candidates` and `apply_validity` read of each candidate (CANDIDATE_COLUMNS)."""
        return list(rows_in(self.db, f"SELECT {CANDIDATE_COLUMNS} FROM memories m WHERE rowid IN ({{marks}})", rowids))

    def apply_validity(self, rows: list[tuple], scored: list[Candidate], as_of: int | None, past: bool,
                       asked: set[str]) -> None:
        """Fact validity over this shard's scored candidates (`scored`, in the order of `rows`); no
        read when none of them states a fact."""
        if any(r[5] for r in rows):
            apply_validity(self.db, scored, as_of, past, asked, self.ranking.stale_factor)

    def hydrate(self, best: list[Candidate]) -> list[dict[str, Any]]:
        """The memories of `best`, in full and in that order, each with its score as `similarity`."""
        if not best:
            return []
        full = {r["rowid"]: r for r in self.db.execute(
            f"SELECT rowid, {MEMORY_COLUMNS} FROM memories WHERE rowid IN ({','.join('?' * len(best))})",
            [c.rowid for c in best])}
        return [dict(row_to_memory(full[c.rowid]), similarity=min(1.0, c.score)) for c in best]
