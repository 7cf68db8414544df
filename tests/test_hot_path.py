"""A query's way through the router (router.routing, router.node_client, router.coalesce, router.link)
makes no asyncio task of its own: it is awaited in its caller's task from the HTTP handler to
Ray's answer (loadtest/hops.py measures what each hop costs). What the tasks used to do still
happens: a call's slot in its node's coalescer lasts until Ray answers, and a lost cluster ends the
calls waiting on it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from node.records import IngestItem
from router.node_client import NodeDown, NodeSlow, Query


def own_entity(cluster) -> tuple[str, int]:
    entity = f"hot-{uuid.uuid4().hex[:10]}"
    return entity, cluster.placement.shard_of(entity)


async def test_a_query_makes_no_task_on_its_way_through_the_router(cluster):
    entity, shard = own_entity(cluster)
    q = Query("what does the user like", entity, 5)
    await cluster.routing.execute(shard, lambda node: node.query(q, shard), read=True)  # warm: the watch may start
    loop = asyncio.get_running_loop()
    made: list[str] = []
    default = loop.get_task_factory()

    def counting(loop, coro, **kwargs):
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return default(loop, coro, **kwargs) if default else asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        for _ in range(5):
            assert await cluster.routing.execute(shard, lambda node: node.query(q, shard), read=True) == []
    finally:
        loop.set_task_factory(default)
    assert [m for m in made if m != "Routing._watch_failovers"] == []


async def test_a_querys_vector_goes_to_its_node_as_bytes(cluster):
    """A vector embedded by the router goes to the node as its float32 bytes, which Ray sends in the
    call itself (an ndarray argument is pickled out of band: 0.2 ms more to submit a call, as much
    again to answer: docs/benchmarks.md); the node answers as it does with the text alone."""
    entity, shard = own_entity(cluster)
    memory_id = f"{entity}::s::0"
    await cluster.ingest([IngestItem(memory_id=memory_id, entity_id=entity, session_id="s", turn_index=0,
                                     created_at_ms=1_000, textual_content="the user likes green tea", shard=shard)])
    node = cluster.nodes[cluster.placement.node_of_shard(shard)]
    coalescer = node.coalescers["query"]
    sent: list[tuple] = []
    send = coalescer._send
    coalescer._send = lambda calls: (sent.extend(calls), send(calls))[1]
    text = "what does the user drink"
    try:
        by_router = await node.query(Query(text, entity, 5), shard, await node.embed_query(text))
    finally:
        coalescer._send = send
    assert type(sent[0][-1]) is bytes
    by_node = await node.query(Query(text, entity, 5), shard)
    assert [h["memory_id"] for h in by_router] == [h["memory_id"] for h in by_node] != []
    assert [h["similarity"] for h in by_router] == pytest.approx([h["similarity"] for h in by_node])


async def test_a_caller_that_gives_up_keeps_its_calls_slot_until_ray_answers(cluster):
    """A node's coalescer sends at most `max_in_flight` calls at once: a call whose caller timed out
    is still out (the node is still working on it) until Ray answers it."""
    entity, shard = own_entity(cluster)
    node = cluster.nodes[cluster.placement.node_of_shard(shard)]
    coalescer = node.coalescers["query"]
    out = coalescer._in_flight
    with pytest.raises(NodeSlow):
        await node.within(1e-6).query(Query("a query its caller gives up on", entity, 5), shard)
    assert coalescer._in_flight == out + 1
    while coalescer._in_flight > out:  # Ray answers the abandoned call; no timing asserted
        await asyncio.sleep(0.01)
    assert await node.query(Query("the next query", entity, 5), shard) == []


async def test_a_lost_cluster_ends_the_calls_waiting_on_it(cluster):
    """router.link: when the router loses the cluster (the head came back as a new one) a call that
    waits on it gives up at once (NodeDown, sent again once the router has joined again)."""
    entity, shard = own_entity(cluster)
    node = cluster.nodes[cluster.placement.node_of_shard(shard)]
    waiting = asyncio.ensure_future(node.query(Query("a query the cluster loses", entity, 5), shard))
    for _ in range(3):  # to its call's await (the node takes milliseconds to answer)
        await asyncio.sleep(0)
    cluster.link.lose("a test")
    try:
        with pytest.raises(NodeDown, match="lost the cluster"):
            await waiting
    finally:
        cluster.link.rejoined()
    assert await node.query(Query("after the rejoin", entity, 5), shard) == []
