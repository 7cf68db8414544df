"""A query over many shards of one node (no `entity_id`) at about the cost of a query of one.

Searching each shard on its own costs a count, two FTS5 MATCH evaluations, a scoring pass and a
hydration per shard, so a query without an entity grew with the shard count (docs/benchmarks.md).
Here the node searches its shards as one collection through its node index (node/node_index.py),
with the same signals and rules as a shard's search (node/store/search.py), in one store-thread turn:
  - dense: the node's 8-bit vectors (node/node_vectors.py) propose the nearest 2 x `pool` of all its
    memories in scope (window, entity-id prefixes) in one scan. A query of at most NODE_EXACT_SCAN
    memories in scope scans exactly instead: each shard proposes its nearest `pool` (its cached
    matrix, or its HNSW index), and the node keeps the `pool` nearest of those scanned exactly;
  - lexical: the node's lexicon (node/lexicon.py) proposes the best `pool` of each FTS table over
    all the shards at once, and gives every candidate its BM25 over the node's rows;
  - every candidate, a slot of the node index (node/node_slots.py) whichever retriever proposed it,
    is scored in one pass over the columns the index keeps (node/node_rows.py: its exact vector,
    time, kind): cosine, both BM25s normalised by the node's best, recency; then fact validity over
    each shard's candidates where one states a fact, read from that shard, as a shard's own search
    does. The node keeps the best `limit` of all, and only their shards read them in full.
A query of one shard (an entity's), without text, or on a node whose index is over its budget
(NODE_INDEX_ROWS) or still loading searches shard by shard and merges (`NodeSearch.search`). The
index loads lazily, the shards of at most NODE_INDEX_LOAD_ROWS memories per query (about 0.5 s),
so the first queries after a start are answered the old way while it fills, and none waits for all.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from node.facts import asked_predicates, asks_about_the_past
from node.lexicon import TABLES
from node.node_index import NodeIndex
from node.node_vectors import best
from node.ranking import Candidate, best_first, oldest_first
from node.store.fact_chains import apply_validity
from node.store.scope import Scope, Window
from node.store.search import Stopwatch
from node.store.shard import ShardStore
from node.shard_set import ShardSet
from node.tuning import NODE_EXACT_SCAN, NODE_INDEX_LOAD_ROWS, NODE_INDEX_ROWS


class NodeSearch:
    """A node's searches over the shards it holds: one shard's, or many through the node index."""

    def __init__(self, copies: ShardSet, dimension: int) -> None:
        self.copies = copies
        self.index = NodeIndex(dimension)

    def search(self, shards: list[int], vector: np.ndarray | None, text: str | None, entity_id: str | None,
               limit: int, window: Window, prefixes: tuple[str, ...] | None,
               stages: dict[str, float]) -> list[dict[str, Any]]:
        """Hits from `shards` (readable copies here), best first; without `text`, the window's
        memories oldest first. On the store thread."""
        if text is not None and entity_id is None and len(shards) > 1:
            wanted = {s: self.copies.store(s) for s in shards}
            if self.index.sync(wanted, self.copies.stores, NODE_INDEX_ROWS, NODE_INDEX_LOAD_ROWS):
                return search_shards(self.index, wanted, vector, text, limit, window, prefixes, stages)
        hits: list[dict[str, Any]] = []
        for s in shards:
            store = self.copies.store(s)
            if text is not None:
                hits.extend(store.search(vector, text, entity_id, limit, window, prefixes, len(shards), stages))
            else:
                clock = Stopwatch(stages)
                hits.extend(store.in_window(entity_id, window, limit, prefixes))
                clock.lap("storage")
        hits.sort(key=oldest_first if text is None else best_first)
        return hits[:limit]

    def close(self) -> None:
        self.index.close()


def search_shards(index: NodeIndex, stores: dict[int, ShardStore], query_vector: np.ndarray, query_text: str,
                  limit: int, window: Window = None, prefixes: tuple[str, ...] | None = None,
                  stages: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The best `limit` memories of `stores` (shard -> store, all current in `index`) for the query,
    best first: exactly min(limit, memories in scope) of them."""
    clock = Stopwatch(stages)
    scope = Scope.of(None, window, prefixes)
    in_scope = index.in_scope(stores.keys(), scope)
    want = min(limit, in_scope)
    if want == 0:
        return []
    ranking = next(iter(stores.values())).ranking
    pool = max(limit, ranking.candidate_pool)
    clock.lap("storage")

    # Candidates are slots of the node index (node/node_slots.py), proposed by either retriever.
    proposed: list[np.ndarray] = []
    if in_scope > NODE_EXACT_SCAN:
        proposed.append(index.vectors.nearest(query_vector, list(stores), 2 * pool, scope))
    else:
        proposed.append(_exact_dense(index, stores, query_vector, scope, pool))
    clock.lap("ann")

    lexicon = index.lexicon
    phrases = lexicon.phrases(query_text)
    matches: list[np.ndarray] = []
    if phrases is not None:
        shards = None if index.all_loaded(stores.keys()) else set(stores)
        for t in range(len(TABLES)):
            matches.append(lexicon.scores(t, phrases, scope, shards))
            proposed.append(lexicon.best(matches[t], pool))
    best_of = [float(m.max(initial=0.0)) for m in matches] or [0.0 for _ in TABLES]
    clock.lap("fts")

    slots = np.unique(np.concatenate(proposed))
    if len(slots) < want:  # the safety net of a shard's search, over the node
        where, args = scope.sql()
        every = [(s, r[0]) for s, store in stores.items()
                 for r in store.db.execute(f"SELECT rowid FROM memories m WHERE {where}", args)]
        held = index.slots.of(every)
        slots = np.unique(np.concatenate([slots, held[held >= 0]]))

    # Every candidate scored in one pass from the rows the index keeps, then fact validity shard by
    # shard where a candidate states a fact (it competes with its slot's other values, in its shard).
    lexical = [m[slots] for m in matches] or [np.zeros(len(slots)) for _ in TABLES]
    scores = index.candidates.scores(slots, query_vector, *lexical, *best_of, scope.end_ms, ranking)
    columns = index.slots.columns
    shard_of = columns["shard"][slots]
    if columns["states_fact"][slots].any():
        past, asked = asks_about_the_past(query_text), asked_predicates(query_text)
        for s in np.unique(shard_of[columns["states_fact"][slots]]).tolist():
            mine = np.flatnonzero(shard_of == s)
            scored = _candidates(index, slots[mine], scores[mine])
            apply_validity(stores[s].db, scored, scope.end_ms, past, asked, ranking.stale_factor)
            scores[mine] = [c.score for c in scored]
    # The best `want`: those scored at least the want-th best, in rank order (ties by time and id).
    top = np.arange(len(scores))
    if len(scores) > want:
        top = np.flatnonzero(scores >= -np.partition(-scores, want - 1)[want - 1])
    ranked = sorted(zip(_candidates(index, slots[top], scores[top]), shard_of[top].tolist()),
                    key=lambda cs: cs[0].rank_key())[:want]
    clock.lap("fuse")

    by_shard: dict[int, list[Candidate]] = {}
    for c, s in ranked:
        by_shard.setdefault(s, []).append(c)
    full = {(s, hit["memory_id"]): hit for s, cs in by_shard.items() for hit in stores[s].searcher.hydrate(cs)}
    hits = [full[(s, c.memory_id)] for c, s in ranked]
    clock.lap("hydrate")
    return hits


def _candidates(index: NodeIndex, slots: np.ndarray, scores: np.ndarray) -> list[Candidate]:
    """Candidates (node.ranking) of `slots` with their `scores`."""
    columns = index.slots.columns
    return [Candidate(score, created, memory_id, rowid) for score, created, memory_id, rowid in zip(
        scores.tolist(), columns["created_at_ms"][slots].tolist(), columns["memory_id"][slots].tolist(),
        columns["rowid"][slots].tolist())]


def _exact_dense(index: NodeIndex, stores: dict[int, ShardStore], query_vector: np.ndarray, scope: Scope,
                 pool: int) -> np.ndarray:
    """The slots of each shard's nearest `pool`; of those scanned exactly, only the `pool` nearest of all."""
    proposed, exact_slots, cosines = [], [], []
    for s, store in stores.items():
        in_scope = index.memories(s, scope)
        if in_scope:
            found, exact = store.searcher.dense(query_vector, scope, in_scope, pool)
            slots = index.slots.of([(s, r) for r in found.tolist()])
            held = slots >= 0  # all of them, the index being current
            if exact is None:
                proposed.append(slots[held])  # HNSW's proposals: no exact cosine to rank them by
            else:
                exact_slots.append(slots[held])
                cosines.append(exact[held])
    return np.concatenate([*proposed, best(exact_slots, cosines, pool)])
