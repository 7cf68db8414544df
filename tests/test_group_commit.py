"""Group commit in a node (no Ray needed): concurrent writes share transactions without losing
ordering, isolation of failures or durability."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time

import pytest

from node.config import ClusterConfig, EmbeddingConfig
from node.ids import parse_memory_id
from node.records import IngestItem
from node.control.placement import Placement
from node.errors import DeadlineExceeded, StorageFull
from node.indexer import INDEX_BACKLOG
from node.errors import NotOwnedError
from node.service import Node
from node.shard_set import shard_dir

SHARDS = 4


def item(entity: str, text: str, memory_id: str, **extra) -> IngestItem:
    parsed = parse_memory_id(memory_id)
    return IngestItem(memory_id=memory_id, entity_id=entity, session_id=parsed.session_id,
                      turn_index=parsed.turn_index, created_at_ms=1_000, textual_content=text,
                      shard=Placement(SHARDS, ("node-0",)).shard_of(entity), **extra)


@pytest.fixture
async def node(tmp_path):
    config = ClusterConfig(data_dir=str(tmp_path), shards=SHARDS, nodes=1, embedding=EmbeddingConfig(backend="torch"))
    n = Node("node-0", config, [0, 1, 2])  # shard 3 is not ours: writes to it fail
    yield n
    await n.close()


def foreign_entity() -> str:
    p = Placement(SHARDS, ("node-0",))
    return next(f"x{i}" for i in range(1000) if p.shard_of(f"x{i}") == 3)


def own_entity(k: int) -> str:
    p = Placement(SHARDS, ("node-0",))
    return [f"u{i}" for i in range(1000) if p.shard_of(f"u{i}") != 3][k]


async def test_concurrent_writes_share_commits_and_all_land(node):
    writes = [node.ingest([item(own_entity(i % 5), f"memory {i}", f"{own_entity(i % 5)}::s::{i}")])
              for i in range(40)]
    assert await asyncio.gather(*writes) == [[None]] * 40
    assert node.grouped_writes == 40 and node.group_commits < 40
    stats = await indexed(node)
    assert stats["memories"] == 40 and stats["vectors"] == 40


async def indexed(node, within: float = 30.0) -> dict:
    """The node's stats once its write-behind index has caught up (writes paused)."""
    deadline = asyncio.get_running_loop().time() + within
    while (stats := await node.stats())["unindexed"] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return stats


async def test_a_pause_in_writes_indexes_every_backlog(node):
    writes = [item(own_entity(i % 3), f"note {i}", f"{own_entity(i % 3)}::s::{i}") for i in range(9)]
    await node.ingest(writes)
    assert (await node.stats())["unindexed"] == 9  # answered before Chroma saw them
    stats = await indexed(node)
    assert (stats["unindexed"], stats["vectors"]) == (0, 9)



class Crash(BaseException):
    """An error none of the indexer's guards expects, as a bug would raise."""


async def test_a_dead_indexer_is_started_again(node, monkeypatch):
    e = own_entity(0)
    await node.ingest([item(e, f"note {i}", f"{e}::s::{i}") for i in range(3)])
    store = node.shards[item(e, "", "x").shard]
    index_pending, calls = store.index_pending, []

    def fails_once(limit=None):
        calls.append(limit)
        if len(calls) == 1:
            raise Crash("the indexer dies here")
        return index_pending(limit)

    monkeypatch.setattr(store, "index_pending", fails_once)
    stats = await indexed(node)
    assert len(calls) >= 2 and node.indexer.restarts == 1
    assert (stats["unindexed"], stats["vectors"]) == (0, 3)

async def test_a_full_backlog_is_indexed_without_waiting_for_a_pause(node):
    e = own_entity(0)
    await node.ingest([item(e, f"line {i}", f"{e}::s::{i}") for i in range(INDEX_BACKLOG)])
    await node.writer.flush()  # the writer indexes full backlogs right after answering, before any pause
    stats = await node.stats()
    assert (stats["unindexed"], stats["vectors"]) == (0, INDEX_BACKLOG)


async def test_a_later_write_of_the_same_id_wins(node):
    e = own_entity(0)
    await asyncio.gather(*(node.ingest([item(e, f"version {v}", f"{e}::s::1")]) for v in range(10)))
    found = await node.inspect(f"{e}::s::1", None, False, 0)
    assert found["textual_content"] == "version 9"


async def test_one_failing_write_fails_alone(node):
    good = [node.ingest([item(own_entity(i), f"fine {i}", f"{own_entity(i)}::s::{i}")]) for i in range(6)]
    bad = node.ingest([item(own_entity(0), "fine too", f"{own_entity(0)}::s::99"),
                       item(foreign_entity(), "not our shard", f"{foreign_entity()}::s::0")])
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert results[:6] == [[None]] * 6
    assert isinstance(results[6], NotOwnedError)
    stats = await node.stats()
    assert stats["memories"] == 6  # the failed request is all-or-nothing: its good item is not stored
    assert await node.inspect(f"{own_entity(0)}::s::99", None, False, 0) is None


async def test_a_write_past_its_deadline_is_not_committed(node):
    """The router gave up on it (503): it must not land later and surprise a retrying client."""
    e = own_entity(3)
    with pytest.raises(DeadlineExceeded):
        await node.ingest([item(e, "too late", f"{e}::s::0")], deadline=time.time() - 0.001)
    assert await node.ingest([item(e, "in time", f"{e}::s::1")], deadline=time.time() + 30) == [None]
    assert await node.inspect(f"{e}::s::0", None, False, 0) is None
    assert (await node.inspect(f"{e}::s::1", None, False, 0))["textual_content"] == "in time"


async def test_writes_are_refused_whole_below_the_free_space_reserve(tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    config = ClusterConfig(data_dir=str(tmp_path), shards=SHARDS, nodes=1, min_free_mb=free_mb + 1024,
                           embedding=EmbeddingConfig(backend="torch"))
    n = Node("node-0", config, list(range(SHARDS)))
    try:
        e = own_entity(0)
        with pytest.raises(StorageFull, match="min_free_mb"):
            await n.ingest([item(e, "no room", f"{e}::s::0")])
        assert (await n.stats())["memories"] == 0
        assert await n.query("no room", e, item(e, "", "x").shard, 5) == []  # reads go on
    finally:
        await n.close()


async def test_an_answered_write_is_committed(node, tmp_path):
    e = own_entity(1)
    await node.ingest([item(e, "durable", f"{e}::s::0")])
    shard = Placement(SHARDS, ("node-0",)).shard_of(e)
    other = sqlite3.connect(shard_dir(tmp_path, shard) / "store.sqlite3")
    assert other.execute("SELECT textual_content FROM memories").fetchall() == [("durable",)]
    other.close()


async def test_dedup_sees_earlier_writes_of_the_same_group(node):
    e = own_entity(2)
    first, second = await asyncio.gather(
        node.ingest([item(e, "I am allergic to peanuts", f"{e}::s::0", enable_semantic_dedup=True)]),
        node.ingest([item(e, "I am allergic to peanuts.", f"{e}::s::1", enable_semantic_dedup=True)]))
    assert first == [None] and second == [f"{e}::s::0"]


async def test_merged_requests_share_passes_and_fail_alone(node):
    """What the router's coalescer sends: several requests in one call, each with its own answer."""
    good = [([item(own_entity(i), f"merged {i}", f"{own_entity(i)}::m::{i}")],) for i in range(4)]
    bad = ([item(foreign_entity(), "not our shard", f"{foreign_entity()}::m::0")],)
    passes = node.embedder.passes
    results = await node.many("ingest", [*good, bad])
    assert results[:4] == [[None]] * 4 and isinstance(results[4], NotOwnedError)
    assert node.embedder.passes - passes == 1  # five requests, one embedding pass
    hits = await node.many("query", [("merged 2", own_entity(2), None, 1, None)])
    assert hits[0][0]["memory_id"] == f"{own_entity(2)}::m::2"
    with pytest.raises(ValueError):
        await node.many("erase", [("x",)])


async def test_a_pause_in_writes_trims_the_change_logs(tmp_path):
    config = ClusterConfig(data_dir=str(tmp_path), shards=SHARDS, nodes=1, changelog_keep=3,
                           embedding=EmbeddingConfig(backend="torch"))
    n = Node("node-0", config, list(range(SHARDS)))
    try:
        e = own_entity(0)
        for i in range(10):
            await n.ingest([item(e, f"note {i}", f"{e}::s::{i}")])
        store = n.shards[item(e, "", "x").shard]
        assert len(store.changes_since(0)) == 10
        for _ in range(100):
            await asyncio.sleep(0.1)
            if len(store.changes_since(0)) == 3:
                break
        assert [c.seq for c in store.changes_since(0)] == [8, 9, 10]
    finally:
        await n.close()


async def test_a_store_turn_takes_a_bounded_group_and_a_large_request_whole(node, monkeypatch):
    import node.writer as writer

    monkeypatch.setattr(writer, "COMMIT_TEXT_CHARS", 100)
    e = own_entity(0)
    big = [item(e, "b" * 150, f"{e}::big::{i}") for i in range(3)]  # over the bound alone: one turn, whole
    writes = [node.ingest([item(e, "s" * 60, f"{e}::s::{i}")]) for i in range(10)] + [node.ingest(big)]
    assert await asyncio.gather(*writes) == [[None]] * 10 + [[None] * 3]
    assert node.grouped_writes == 11
    assert node.group_commits >= 10  # at most one 60-character write per turn fits within 100 characters
    assert (await node.stats())["memories"] == 13


async def test_a_write_does_not_wait_for_every_full_backlog_to_be_indexed(node):
    """After a large commit every shard's backlog is full. Indexing it takes the store thread in
    chunks, and a write that arrives meanwhile takes its turn between two chunks: it used to wait
    until the writer had indexed every backlog (seconds, after a bulk import)."""
    entities = [next(own_entity(k) for k in range(100) if item(own_entity(k), "", "x").shard == s) for s in (0, 1, 2)]
    big = [item(e, f"bulk line {i} about the garden", f"{e}::bulk::{i}") for e in entities
           for i in range(4 * INDEX_BACKLOG)]
    await node.ingest(big)  # answered after its commit; the backlogs (24 chunks) are indexed now
    index_before = node.store_thread.busy["index"]
    await node.ingest([item(entities[0], "a small write", f"{entities[0]}::small::0")])
    index_during = node.store_thread.busy["index"] - index_before
    await node.writer.flush()
    index_total = node.store_thread.busy["index"]  # the full backlogs, all indexed by now
    stats = await indexed(node)  # and the small write's row once writes pause
    assert stats["unindexed"] == 0 and stats["vectors"] == len(big) + 1
    assert index_during < 0.7 * index_total, (index_during, index_total)  # about 0.25 here; 1.0 before
