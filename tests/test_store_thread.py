"""Searches before index chunks on a node's store thread (node/store_thread.py, node/indexer.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from node import indexer
from node.indexer import INDEX_CHUNK, INDEX_CHUNK_NEAR_SEARCHES, Indexer
from node.store import MemoryRecord, ShardStore
from node.store_thread import StoreThread


def test_an_index_chunk_waits_for_the_search_in_flight():
    async def main():
        thread = StoreThread("t")
        order = []
        search_started = asyncio.Event()

        async def search():
            async with thread.searching():
                search_started.set()
                await asyncio.sleep(0.2)  # embedding, say
                await thread.run(lambda: order.append("search"), busy="search")

        async def chunk():
            await search_started.wait()
            await thread.yield_to_searches(0.01)
            await thread.run(lambda: order.append("chunk"), busy="index")

        await asyncio.gather(search(), chunk())
        thread.shutdown()
        return order, thread.searches

    assert asyncio.run(main()) == (["search", "chunk"], 0)


class CountingStoreThread(StoreThread):
    """The real store thread, recording the chunk size of each index call."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.chunks: list[int] = []

    async def run(self, fn, *args, busy=None):
        if busy == "index":
            self.chunks.append(args[0])
        return await super().run(fn, *args, busy=busy)


@pytest.fixture
def store(tmp_path):
    store = ShardStore(tmp_path / "0000", 0, 8)
    yield store
    store.close()


def write(store: ShardStore, n: int = 40) -> None:
    vectors = np.random.default_rng(3).standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.upsert([MemoryRecord(f"e::s1::{i}", "e", "s1", i, 1_000 + i, None, f"memory {i}", (), v)
                  for i, v in enumerate(vectors)])


def test_chunks_are_small_while_queries_arrive(store):
    async def index(recent_search: bool) -> list[int]:
        write(store)
        thread = CountingStoreThread("t")
        if recent_search:
            async with thread.searching():
                pass
        await Indexer("t", thread, lambda: [store], 100).index_backlogs(1)
        thread.shutdown()
        return thread.chunks

    assert asyncio.run(index(recent_search=False)) == [INDEX_CHUNK]
    assert store.unindexed == 0
    near = asyncio.run(index(recent_search=True))
    assert near == [INDEX_CHUNK_NEAR_SEARCHES] * len(near) and len(near) >= 40 // INDEX_CHUNK_NEAR_SEARCHES
    assert store.unindexed == 0 and store.stats()["vectors"] == 40


@pytest.mark.parametrize("urgent", [False, True])
def test_a_stream_of_searches_holds_the_index_back_until_the_backlog_is_large(store, monkeypatch, urgent):
    if urgent:
        monkeypatch.setattr(indexer, "INDEX_URGENT", 40)  # instead of writing 8,192 rows

    async def main():
        write(store)
        thread = CountingStoreThread("t")
        release = asyncio.Event()

        async def endless_search():
            async with thread.searching():
                await release.wait()

        searching = asyncio.create_task(endless_search())
        await asyncio.sleep(0)
        backlog = asyncio.create_task(Indexer("t", thread, lambda: [store], 100).index_backlogs(1))
        await asyncio.wait([backlog], timeout=0.3)
        while_searching = store.unindexed
        release.set()
        await searching
        await asyncio.wait_for(backlog, timeout=60)
        thread.shutdown()
        return while_searching, thread.chunks

    while_searching, chunks = asyncio.run(main())
    assert while_searching == (0 if urgent else 40)
    assert chunks == ([INDEX_CHUNK] if urgent else [INDEX_CHUNK_NEAR_SEARCHES] * 5)
    assert store.unindexed == 0
