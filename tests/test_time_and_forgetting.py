"""Time windows (GET /temporal/query, point_in_time_ms) and the right to be forgotten
(POST /entity/export, POST /entity/erase), through the in-process API on a real cluster."""

from __future__ import annotations

import json
import uuid

from conftest import API_KEY
from test_api import assert_error, ingest_batch, inspect, post, query, uid

AUTH = {"x-api-key": API_KEY}
DAY = 86_400_000
T0 = 1_700_000_000_000


async def temporal(api, **params):
    r = await api.get("/temporal/query", params={k: str(v) for k, v in params.items()}, headers=AUTH)
    return r.status, await r.json()


async def seed_days(api, entity: str, n: int = 10) -> None:
    await ingest_batch(api, [{"entity_id": entity, "textual_content": f"Day {d}: went hiking near the lake",
                              "memory_id": f"{entity}::trip::{d}", "timestamp": T0 + d * DAY} for d in range(n)])


async def test_temporal_query_returns_only_in_window_memories(api):
    e = uid("time")
    await seed_days(api, e)
    status, hits = await temporal(api, entity_id=e, textual_query="hiking lake", window_start_ms=T0 + 3 * DAY,
                                  window_end_ms=T0 + 5 * DAY, limit=10)
    assert status == 200
    assert sorted(h["created_at_ms"] for h in hits) == [T0 + 3 * DAY, T0 + 4 * DAY, T0 + 5 * DAY]
    assert set(hits[0]) >= {"memory_id", "entity_id", "session_id", "turn_index", "created_at_ms", "similarity",
                            "textual_content"}
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)


async def test_temporal_query_without_text_lists_the_window_in_time_order(api):
    e = uid("time")
    await seed_days(api, e)
    status, hits = await temporal(api, entity_id=e, window_start_ms=T0 + 6 * DAY, limit=3)
    assert status == 200
    assert [h["memory_id"] for h in hits] == [f"{e}::trip::{d}" for d in (6, 7, 8)]
    status, hits = await temporal(api, entity_id=e, window_end_ms=T0 + DAY)
    assert [h["memory_id"] for h in hits] == [f"{e}::trip::0", f"{e}::trip::1"]


async def test_temporal_query_fans_out_without_an_entity(api):
    a, b = uid("time"), uid("time")
    await seed_days(api, a, 3)
    await seed_days(api, b, 3)
    status, hits = await temporal(api, textual_query="hiking", window_start_ms=T0 + 2 * DAY,
                                  window_end_ms=T0 + 2 * DAY, limit=100)
    mine = {h["memory_id"] for h in hits} & {f"{a}::trip::2", f"{b}::trip::2", f"{a}::trip::1"}
    assert mine == {f"{a}::trip::2", f"{b}::trip::2"}
    assert all(h["created_at_ms"] == T0 + 2 * DAY for h in hits)


async def test_temporal_query_validation(api):
    for params in ({"window_start_ms": "abc"}, {"window_start_ms": 5, "window_end_ms": 4}, {"limit": 0},
                   {"limit": 100000}, {"entity_id": ""}):
        status, body = await temporal(api, **params)
        assert_error(status, body, 422, "validation_error")
    r = await api.get("/temporal/query")
    assert r.status == 401


async def test_point_in_time_sees_only_what_existed_then(api):
    e = uid("pit")
    await seed_days(api, e, 5)
    status, hits = await post(api, "/query/semantic", {"textual_query": "hiking", "entity_id": e, "limit": 10,
                                                       "point_in_time_ms": T0 + 2 * DAY})
    assert status == 200
    assert sorted(h["created_at_ms"] for h in hits) == [T0, T0 + DAY, T0 + 2 * DAY]
    assert len(await query(api, "hiking", e, limit=10)) == 5


async def test_export_streams_everything_about_an_entity(api):
    e = uid("export")
    await ingest_batch(api, [
        {"entity_id": e, "textual_content": "I live in Austin", "relations": [["lives_in", "Austin"]],
         "memory_id": f"{e}::s::0", "timestamp": T0},
        {"entity_id": e, "textual_content": "Café ☕ every morning", "memory_id": f"{e}::s::1", "timestamp": T0 + 1},
    ])
    r = await api.post("/entity/export", data=json.dumps({"entity_id": e}), headers=AUTH)
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in (await r.text()).splitlines()]
    assert lines[0]["type"] == "entity" and lines[0]["entity_id"] == e
    memories = [x for x in lines if x["type"] == "memory"]
    assert [m["textual_content"] for m in memories] == ["I live in Austin", "Café ☕ every morning"]
    assert [x for x in lines if x["type"] == "relation"] == [
        {"type": "relation", "source": e, "edge_type": "lives_in", "target": "Austin", "memory_id": f"{e}::s::0",
         "timestamp_ms": T0}]
    assert lines[-1] == {"type": "summary", "memories": 2, "relations": 1, "measurements": 0}


async def test_erase_removes_the_entity_everywhere_and_nothing_else(api):
    gone, kept = uid("erase"), uid("keep")
    token = f"tok{uuid.uuid4().hex[:8]}"
    await ingest_batch(api, [{"entity_id": gone, "textual_content": f"my passport {token} number {i}",
                              "relations": [["has", token]], "memory_id": f"{gone}::s::{i}"} for i in range(5)])
    await ingest_batch(api, [{"entity_id": kept, "textual_content": f"unrelated {token}"}])
    status, body = await post(api, "/entity/erase", {"entity_id": gone})
    assert status == 200
    assert (body["entity_id"], body["erased"], body["memories"], body["relations"]) == (gone, True, 5, 5)
    assert await query(api, f"passport {token}", gone, limit=10) == []
    assert [h["entity_id"] for h in await query(api, token, None, limit=50) if token in h["textual_content"]] == [kept]
    status, _ = await inspect(api, f"{gone}::s::0")
    assert status == 404
    status, hits = await temporal(api, entity_id=gone)
    assert status == 200 and hits == []
    r = await api.post("/entity/export", data=json.dumps({"entity_id": gone}), headers=AUTH)
    assert [json.loads(x)["type"] for x in (await r.text()).splitlines()] == ["entity", "summary"]
    status, again = await post(api, "/entity/erase", {"entity_id": gone})
    assert status == 200 and again["memories"] == 0
    status, body = await post(api, "/entity/erase", {"entity_id": ""})
    assert_error(status, body, 422, "validation_error")
