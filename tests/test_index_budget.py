"""A node's memory budget for vector indexes (node/index_budget.py): real shards, real Chroma."""

from __future__ import annotations

import pytest

from node.index_budget import IndexBudget, index_bytes
from node.store import MemoryRecord, ShardStore

TEXTS = ["User prefers dark mode", "User works at Acme Corp", "User's dog is called Rex",
         "User is learning Portuguese", "User lives in Lisbon", "User runs on Sundays"]


@pytest.fixture
def shards(tmp_path, embedder):
    """Three shards of six memories each, sharing one budget that holds about one shard's index."""
    budget = IndexBudget(int(1.5 * index_bytes(len(TEXTS), embedder.dimension)))
    stores = []
    for shard in range(3):
        store = ShardStore(tmp_path / f"{shard:04d}", shard, embedder.dimension, index_budget=budget)
        store.exact_scan = store.shard_exact_scan = 0  # search through Chroma, so a query needs the index loaded
        vectors = embedder.encode(TEXTS)
        store.upsert([MemoryRecord(f"e{shard}::s1::{i}", f"e{shard}", "s1", i, 1_000 + i, None, text, (), vector)
                      for i, (text, vector) in enumerate(zip(TEXTS, vectors))])
        store.index_pending()
        stores.append(store)
    yield budget, stores
    for store in stores:
        store.close()


def top(store, embedder, text):
    return store.search(embedder.encode([text])[0], text, f"e{store.shard_id}", 1)[0]["memory_id"]


def test_cold_indexes_leave_memory_and_come_back_on_use(shards, embedder):
    budget, stores = shards
    assert budget.count == 1 and stores[2].index.is_loaded  # indexing each shard evicted the one before
    assert budget.bytes <= budget.max_bytes and budget.unloads == 2
    for store in stores:  # each query loads its shard again, and evicts the coldest
        assert top(store, embedder, "where does the user live?") == f"e{store.shard_id}::s1::4"
        assert store.index.is_loaded and budget.count == 1
    assert [s.index.is_loaded for s in stores] == [False, False, True]
    assert budget.loads == 6 and budget.unloads == 5


def test_counting_vectors_does_not_load_an_index(shards):
    budget, stores = shards
    loads = budget.loads
    assert [s.stats()["vectors"] for s in stores] == [len(TEXTS)] * 3
    assert budget.loads == loads and not stores[0].index.is_loaded


def test_without_a_budget_every_index_stays_loaded(tmp_path, embedder):
    budget = IndexBudget(0)
    stores = [ShardStore(tmp_path / f"{shard:04d}", shard, embedder.dimension, index_budget=budget) for shard in range(2)]
    try:
        for shard, store in enumerate(stores):
            vector = embedder.encode(["User prefers tea"])[0]
            store.upsert([MemoryRecord(f"e::s1::{shard}", "e", "s1", shard, 1_000, None, "User prefers tea", (), vector)])
            store.index_pending()
        assert budget.count == 2 and budget.unloads == 0 and all(s.index.is_loaded for s in stores)
    finally:
        for store in stores:
            store.close()
    assert budget.count == 0  # a closed shard's index no longer counts


def test_an_index_larger_than_the_budget_still_serves(shards, embedder):
    budget, stores = shards
    budget.max_bytes = 1
    assert top(stores[0], embedder, "what pet does the user have?") == "e0::s1::2"
    assert budget.count == 1 and stores[0].index.is_loaded
