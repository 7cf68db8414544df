"""A memory id names one memory in the whole cluster, however many clients race to write it, and
writing a free-form id needs only the nodes that hold its home and its memory (node/id_homes.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

from conftest import http_json
from test_api import inspect, post, uid


async def copies(api, memory_id: str, entities: list[str]) -> list[str]:
    """The entities whose own queries return `memory_id`."""
    held = []
    for e in entities:
        status, hits = await post(api, "/query/semantic", {"textual_query": "the shared note", "entity_id": e,
                                                           "limit": 50})
        assert status == 200, hits
        if any(h["memory_id"] == memory_id for h in hits):
            held.append(e)
    return held


async def test_concurrent_writers_of_one_free_form_id_leave_one_memory(api):
    entities = [uid(f"racer{i}") for i in range(16)]
    for round_ in range(3):
        mid = f"shared-{uuid.uuid4().hex}"
        answers = await asyncio.gather(*(post(api, "/ingest", {"entity_id": e, "memory_id": mid,
                                                               "textual_content": f"the shared note, by {e}"})
                                         for e in entities))
        assert all(status == 201 for status, _ in answers), answers
        held = await copies(api, mid, entities)
        assert len(held) == 1, f"round {round_}: {mid} is held by {len(held)} entities"
        status, found = await inspect(api, mid)
        assert status == 200 and found["entity_id"] == held[0]
        status, hits = await post(api, "/query/semantic", {"textual_query": "the shared note", "limit": 1000})
        assert [h["memory_id"] for h in hits].count(mid) == 1


async def test_batches_racing_on_free_form_ids_leave_one_memory_each(api):
    entities = [uid(f"batch{i}") for i in range(8)]
    ids = [f"b-{uuid.uuid4().hex}" for _ in range(4)]
    answers = await asyncio.gather(*(post(api, "/ingest/batch", {"items": [
        {"entity_id": e, "memory_id": m, "textual_content": f"the shared note {m} by {e}"} for m in ids]})
        for e in entities))
    assert all(status == 201 for status, _ in answers), answers
    for m in ids:
        assert len(await copies(api, m, entities)) == 1, m


async def test_a_free_form_id_moves_and_is_deleted_in_one_piece(api):
    a, b = uid("from"), uid("to")
    mid = f"mover-{uuid.uuid4().hex}"
    for e in (a, b, a, b):
        status, _ = await post(api, "/ingest", {"entity_id": e, "memory_id": mid, "textual_content": "the shared note"})
        assert status == 201
    assert await copies(api, mid, [a, b]) == [b]
    status, body = await post(api, "/memory/delete", {"memory_id": mid})
    assert status == 200 and body["deleted"] is True
    assert await copies(api, mid, [a, b]) == []
    assert (await inspect(api, mid))[0] == 404
    status, body = await post(api, "/memory/delete", {"memory_id": mid})
    assert status == 200 and body["deleted"] is False


async def test_erasing_an_entity_forgets_where_its_free_form_ids_lived(api, cluster):
    e = uid("erased")
    mid = f"secret-{uuid.uuid4().hex}"
    assert (await post(api, "/ingest", {"entity_id": e, "memory_id": mid, "textual_content": "the note"}))[0] == 201
    status, _ = await post(api, "/entity/erase", {"entity_id": e})
    assert status == 200
    home = cluster.placement.id_home(mid)
    node = cluster.actors[cluster.placement.node_of_shard(home)]
    assert await node.inspect_free.remote(mid, False, 0) is None
    assert await node.delete_free.remote(mid) is False  # no record left to find


def test_a_stalled_node_holds_up_only_its_own_writes(make_server, tmp_path):
    """Before, every free-form write asked every node to delete old copies: one stalled node
    failed them all. Now an id whose home and memory are on live nodes is written as usual."""
    from node.control.placement import Placement

    config = tmp_path / "cluster.yaml"
    config.write_text("request_timeout_s: 8\n")
    server = make_server(TELLODB_CONFIG=str(config), TELLODB_NODES="2").start()
    base = server.base_url
    nodes = http_json(base, "/stats")[1]["nodes"]
    placement = Placement(8, tuple(sorted(nodes)))
    live, stalled = "node-0", "node-1"
    entity = next(e for e in (f"user-{i}" for i in range(1000)) if placement.node_of(e) == live)
    mid = next(m for m in (f"free-{i}" for i in range(1000))
               if placement.node_of_shard(placement.id_home(m)) == live)
    os.kill(nodes[stalled]["pid"], signal.SIGSTOP)
    try:
        for version in range(2):  # a new id, then an upsert of it
            status, body = http_json(base, "/ingest", {"entity_id": entity, "memory_id": mid,
                                                   "textual_content": f"written while a node is stalled {version}"})
            assert status == 201, body
        status, found = http_json(base, "/memory/inspect", {"memory_id": mid})
        assert status == 200 and found["textual_content"].endswith("1"), found
        far = next(m for m in (f"far-{i}" for i in range(1000))
                   if placement.node_of_shard(placement.id_home(m)) == stalled)
        status, body = http_json(base, "/ingest", {"entity_id": entity, "memory_id": far, "textual_content": "x"})
        assert status == 503, body  # its home is on the stalled node: a clear "retry", never a 500
        # A batch over both nodes times out on the stalled one; the live node's part, with ids the
        # engine made, is taken back, so a retry cannot duplicate it.
        other = next(e for e in (f"user-{i}" for i in range(1000)) if placement.node_of(e) == stalled)
        status, body = http_json(base, "/ingest/batch", {"items": [
            {"entity_id": e, "textual_content": "a batch in doubt"} for e in (entity, other)]})
        assert status == 503, body
    finally:
        os.kill(nodes[stalled]["pid"], signal.SIGCONT)
    # The stalled node wakes up past the router's deadline: its part is dropped, not committed late.
    time.sleep(2)
    for e in (entity, other):
        status, hits = http_json(base, "/query/semantic", {"textual_query": "a batch in doubt", "entity_id": e})
        assert status == 200 and all(h["textual_content"] != "a batch in doubt" for h in hits), (e, hits)
