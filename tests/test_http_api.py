"""The HTTP API through an in-process aiohttp client, on a real local Ray cluster (two node actors)."""

import json
import uuid

import pytest

from conftest import API_KEY

AUTH = {"x-api-key": API_KEY}


def ent() -> str:
    return f"user:{uuid.uuid4().hex[:10]}"


async def post(api, path, body, status=200, headers=AUTH):
    r = await api.post(path, data=json.dumps(body) if not isinstance(body, (bytes, str)) else body, headers=headers)
    data = await r.json()
    assert r.status == status, data
    return data


async def ingest(api, entity, text, **extra):
    return await post(api, "/ingest", {"entity_id": entity, "textual_content": text, **extra})


async def query(api, text, entity=None, limit=10):
    return await post(api, "/query/semantic", {"textual_query": text, "entity_id": entity, "limit": limit})


async def test_health_and_metrics_are_open(api):
    for path in ("/health", "/v1/health"):
        r = await api.get(path)
        assert r.status == 200 and await r.json() == {"status": "ok"}
    r = await api.get("/metrics")
    assert r.status == 200
    assert "tellodb_ingest_total" in await r.text()


async def test_version_needs_the_key_in_either_header(api):
    r = await api.get("/version")
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "unauthorized"
    for headers in ({"x-api-key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        r = await api.get("/v1/version", headers=headers)
        body = await r.json()
        assert r.status == 200 and body["auth_required"] is True and body["engine_version"]
    r = await api.get("/version", headers={"x-api-key": API_KEY + "x"})
    assert r.status == 401


async def test_ingest_query_inspect_delete(api):
    e = ent()
    await ingest(api, e, "User prefers dark mode and uses a screen reader", memory_id=f"{e}::session-1::0")
    await ingest(api, e, "User works at Acme Corp as a software engineer", memory_id=f"{e}::session-1::1")
    hits = await query(api, "What are the user's accessibility preferences?", e)
    assert [h["memory_id"] for h in hits] == [f"{e}::session-1::0", f"{e}::session-1::1"]
    assert set(hits[0]) >= {"memory_id", "entity_id", "session_id", "turn_index", "created_at_ms", "similarity",
                            "textual_content"}
    assert hits[0]["similarity"] >= hits[1]["similarity"] and all(0 <= h["similarity"] <= 1 for h in hits)
    assert (hits[0]["session_id"], hits[0]["turn_index"]) == ("session-1", 0)

    memory = await post(api, "/memory/inspect", {"memory_id": f"{e}::session-1::1", "include_turn_window": True,
                                                 "turn_window_radius": 1})
    assert memory["textual_content"].startswith("User works") and memory["entity_id"] == e
    assert [m["turn_index"] for m in memory["turn_window"]] == [0, 1]

    assert await post(api, "/memory/delete", {"memory_id": f"{e}::session-1::0"}) == {
        "deleted": True, "memory_id": f"{e}::session-1::0"}
    assert (await post(api, "/memory/delete", {"memory_id": f"{e}::session-1::0"}))["deleted"] is False
    await post(api, "/memory/inspect", {"memory_id": f"{e}::session-1::0"}, status=404)
    assert [h["memory_id"] for h in await query(api, "screen reader", e)] == [f"{e}::session-1::1"]


async def test_default_ids_timestamps_and_relations(api):
    e = ent()
    out = await ingest(api, e, "Bob moved to Seattle", timestamp=1_700_000_000_000,
                       relations=[["lives_in", "Seattle"], ["bob", "works_at", "Initech"]], kind="fact")
    assert out["memory_id"].startswith(f"{e}::sdk::")
    memory = await post(api, "/memory/inspect", {"memory_id": out["memory_id"]})
    assert memory["created_at_ms"] == 1_700_000_000_000 and memory["kind"] == "fact"
    assert memory["relations"] == [[e, "lives_in", "Seattle"], ["bob", "works_at", "Initech"]]
    assert memory["session_id"] == "sdk" and memory["turn_index"] == 0


async def test_upsert_replaces(api):
    e = ent()
    mid = f"{e}::s::1"
    await ingest(api, e, "I live in Austin", memory_id=mid)
    await ingest(api, e, "I live in Seattle", memory_id=mid)
    hits = await query(api, "Austin", e, limit=10)
    assert [(h["memory_id"], h["textual_content"]) for h in hits] == [(mid, "I live in Seattle")]


async def test_hit_count_is_min_of_limit_and_memories(api):
    e = ent()
    out = await post(api, "/ingest/batch", {"items": [
        {"entity_id": e, "textual_content": f"note {i} about gardening and tomatoes"} for i in range(7)]})
    assert out["ingested"] == 7 and len(set(out["memory_ids"])) == 7
    assert len(await query(api, "gardening", e, limit=3)) == 3
    assert len(await query(api, "gardening", e, limit=50)) == 7
    assert len(await query(api, "nothing in common", e, limit=50)) == 7
    assert (await post(api, "/ingest/batch", {"items": []}))["ingested"] == 0


async def test_entity_isolation_and_fan_out(api):
    a, b = ent(), ent()
    await ingest(api, a, "My passport number is K1234567")
    await ingest(api, b, "I collect stamps")
    hits = await query(api, "passport number K1234567", b, limit=10)
    assert [h["entity_id"] for h in hits] == [b]
    everywhere = await query(api, "passport number K1234567", None, limit=5)
    assert everywhere[0]["entity_id"] == a
    sims = [h["similarity"] for h in everywhere]
    assert sims == sorted(sims, reverse=True)


async def test_exact_tokens_and_unicode(api):
    e = ent()
    items = [{"entity_id": e, "textual_content": f"Order {n} shipped"} for n in range(50100, 50130)]
    items += [{"entity_id": e, "textual_content": "Türcode ZX-99817 für Zoë 🚀"},
              {"entity_id": e, "textual_content": "東京で寿司を食べた"}]
    await post(api, "/ingest/batch", {"items": items})
    assert (await query(api, "ZX-99817", e))[0]["textual_content"] == "Türcode ZX-99817 für Zoë 🚀"
    assert (await query(api, "Order 50117", e))[0]["textual_content"] == "Order 50117 shipped"
    assert (await query(api, "zoe", e))[0]["textual_content"].startswith("Türcode")
    assert (await query(api, "東京で寿司を食べた", e))[0]["textual_content"] == "東京で寿司を食べた"


async def test_unknown_ids_are_404_or_not_deleted(api):
    await post(api, "/memory/inspect", {"memory_id": "no-such-id"}, status=404)
    assert (await post(api, "/memory/delete", {"memory_id": "nobody::s::1"}))["deleted"] is False


async def test_metrics_count_requests_and_nodes(api):
    e = ent()
    await ingest(api, e, "metrics please")
    await query(api, "metrics", e)
    await post(api, "/query/semantic", {"textual_query": ""}, status=422)
    text = await (await api.get("/metrics")).text()
    for needle in ("tellodb_ingest_total", "tellodb_query_total", 'tellodb_query_duration_seconds_bucket{le="0.05"}',
                   'tellodb_http_requests_total{method="POST",route="/query/semantic",status="422"}',
                   "tellodb_http_request_duration_seconds_bucket", 'tellodb_node_memories{node="node-0"}',
                   'tellodb_node_up{node="node-1"} 1.0', "tellodb_node_shards"):
        assert needle in text, needle
    stats = await (await api.get("/stats", headers=AUTH)).json()
    assert stats["memories"] >= 1 and set(stats["nodes"]) == {"node-0", "node-1"}


MALFORMED = [
    ("/ingest", b"{bad json", 400),
    ("/ingest", b"", 400),
    ("/ingest", b"\xff\xfe{}", 400),
    ("/ingest", b'{"entity_id": "a", "textual_content": "\\ud800"}', 400),
    ("/ingest", b"[1, 2]", 422),
    ("/ingest", b'"text"', 422),
    ("/ingest", {"textual_content": "x"}, 422),
    ("/ingest", {"entity_id": 5, "textual_content": "x"}, 422),
    ("/ingest", {"entity_id": "", "textual_content": "x"}, 422),
    ("/ingest", {"entity_id": "a\u0000b", "textual_content": "x"}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "   "}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "timestamp": "123"}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "timestamp": -1}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "timestamp": 1.5}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "timestamp": 10**30}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "relations": [["only-one"]]}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "relations": [["a", "b", "c", "d"]]}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "relations": "lives_in"}, 422),
    ("/ingest", {"entity_id": "a", "textual_content": "x", "enable_semantic_dedup": "yes"}, 422),
    ("/ingest/batch", {"items": "nope"}, 422),
    ("/ingest/batch", {"items": [{"entity_id": "a"}]}, 422),
    ("/ingest/batch", {"items": [{"entity_id": "a", "textual_content": "x"}] * 1001}, 422),
    ("/query/semantic", {"limit": 3}, 422),
    ("/query/semantic", {"textual_query": "x", "limit": 0}, 422),
    ("/query/semantic", {"textual_query": "x", "limit": -1}, 422),
    ("/query/semantic", {"textual_query": "x", "limit": 100000}, 422),
    ("/query/semantic", {"textual_query": "x", "limit": "5"}, 422),
    ("/query/semantic", {"textual_query": "x", "entity_id": ""}, 422),
    ("/query", {"textual_query": ["x"]}, 422),
    ("/memory/inspect", {}, 422),
    ("/memory/inspect", {"memory_id": "a", "include_turn_window": "yes"}, 422),
    ("/memory/inspect", {"memory_id": "a", "turn_window_radius": 1000}, 422),
    ("/memory/delete", {"memory_id": None}, 422),
    ("/no/such/route", {}, 404),
]


@pytest.mark.parametrize("path, body, status", MALFORMED)
async def test_malformed_requests_get_json_4xx(api, path, body, status):
    data = body if isinstance(body, bytes) else json.dumps(body)
    r = await api.post(path, data=data, headers={**AUTH, "content-type": "application/json"})
    payload = await r.json()
    assert r.status == status, payload
    assert set(payload["error"]) == {"code", "message"} and payload["error"]["message"]


async def test_wrong_method_and_oversized_body(api):
    r = await api.get("/ingest", headers=AUTH)
    assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"
    big = json.dumps({"entity_id": "a", "textual_content": "x" * (11 * 1024 * 1024)})
    r = await api.post("/ingest", data=big, headers=AUTH)
    assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"


async def test_validation_messages_name_the_field(api):
    body = await post(api, "/ingest/batch", {"items": [{"entity_id": "a", "textual_content": "x"},
                                                       {"entity_id": "a", "textual_content": "x", "timestamp": "t"}]},
                      status=422)
    assert "items.1.timestamp" in body["error"]["message"]
