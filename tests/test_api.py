"""The HTTP API through the in-process aiohttp client, backed by the real session cluster
(local Ray, two node actors, eight shards, the real model, SQLite/FTS5 and Chroma).

The cluster is shared by the whole session, so every test works on entities of its own (uuid).
"""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from conftest import API_KEY

AUTH = {"x-api-key": API_KEY}


# ---- helpers --------------------------------------------------------------------------------

def uid(prefix: str = "ent") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def on_two_shards(cluster, prefix_a: str, prefix_b: str) -> tuple[str, str]:
    """Two fresh entity ids that live in different shards."""
    a, b = uid(prefix_a), uid(prefix_b)
    while cluster.placement.shard_of(a) == cluster.placement.shard_of(b):
        b = uid(prefix_b)
    return a, b


def assert_error(status: int, body, expected_status: int, code: str | None = None) -> None:
    """A JSON error body `{"error": {"code": str, "message": str}}` with the expected status."""
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and isinstance(err.get("code"), str) and err["code"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body


async def post(api, path: str, body, headers=AUTH):
    resp = await api.post(path, json=body, headers=headers)
    return resp.status, await resp.json()


async def ingest(api, entity_id: str, text: str, **extra) -> dict:
    status, body = await post(api, "/ingest", {"entity_id": entity_id, "textual_content": text, **extra})
    assert status == 201, body
    assert body["status"] == "ok" and body["entity_id"] == entity_id
    return body


async def ingest_batch(api, items: list[dict]) -> dict:
    status, body = await post(api, "/ingest/batch", {"items": items})
    assert status == 201, body
    return body


async def query(api, text: str, entity_id: str | None = None, limit: int = 10) -> list[dict]:
    payload = {"textual_query": text, "limit": limit, "entity_id": entity_id}  # null: all entities, as the SDK sends
    status, body = await post(api, "/query/semantic", payload)
    assert status == 200, body
    assert isinstance(body, list)
    return body


async def inspect(api, memory_id: str, **extra):
    return await post(api, "/memory/inspect", {"memory_id": memory_id, **extra})


def assert_ranked(hits: list[dict]) -> None:
    sims = [h["similarity"] for h in hits]
    assert all(0.0 <= s <= 1.0 for s in sims), sims
    assert sims == sorted(sims, reverse=True), sims


# ---- open endpoints, version, auth ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/health", "/v1/health"])
async def test_health_is_open(api, path):
    resp = await api.get(path)
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_metrics_open_and_complete(api):
    ent = uid()
    await ingest(api, ent, "metrics probe memory about a red bicycle")
    await query(api, "red bicycle", ent)
    await api.get("/definitely-not-a-route", headers=AUTH)

    resp = await api.get("/metrics")  # no key
    assert resp.status == 200
    text = await resp.text()
    for name in ("tellodb_ingest_total", "tellodb_query_total", "tellodb_query_duration_seconds_bucket",
                 "tellodb_http_requests_total", "tellodb_node_memories"):
        assert re.search(rf"^{name}\b", text, re.M), name

    def sample(pattern: str) -> float:
        m = re.search(pattern, text, re.M)
        assert m, pattern
        return float(m.group(1))

    assert sample(r"^tellodb_ingest_total (\S+)$") >= 1
    assert sample(r"^tellodb_query_total (\S+)$") >= 1
    # labelled by route template, method and status
    assert sample(r'^tellodb_http_requests_total\{(?=[^}]*route="/ingest")(?=[^}]*method="POST")'
                  r'(?=[^}]*status="201")[^}]*\} (\S+)$') >= 1
    assert sample(r'^tellodb_http_requests_total\{(?=[^}]*route="/query/semantic")'
                  r'(?=[^}]*status="200")[^}]*\} (\S+)$') >= 1
    assert sample(r'^tellodb_http_requests_total\{(?=[^}]*status="404")[^}]*\} (\S+)$') >= 1
    nodes = re.findall(r'^tellodb_node_memories\{node="(node-\d+)"\} (\S+)$', text, re.M)
    assert {n for n, _ in nodes} == {"node-0", "node-1"}
    assert sum(float(v) for _, v in nodes) >= 1
    # each node process's own memory, and its HNSW indexes' share (index_memory_mb)
    memory = re.findall(r'^tellodb_node_memory_bytes\{node="(node-\d+)"\} (\S+)$', text, re.M)
    assert {n for n, _ in memory} == {"node-0", "node-1"} and min(float(v) for _, v in memory) > 50 * 2**20
    for name in ("tellodb_node_index_memory_bytes", "tellodb_node_index_loads", "tellodb_node_spanning_index_bytes"):
        assert {n for n in re.findall(rf'^{name}\{{node="(node-\d+)"\}} \S+$', text, re.M)} == {"node-0", "node-1"}


@pytest.mark.parametrize("path", ["/version", "/v1/version"])
async def test_version_requires_key(api, path):
    resp = await api.get(path)
    assert_error(resp.status, await resp.json(), 401, "unauthorized")
    resp = await api.get(path, headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    from router import __version__

    assert body == {"engine_version": __version__, "api_version": "v1", "auth_required": True}


@pytest.mark.parametrize("headers", [
    {"x-api-key": API_KEY},
    {"Authorization": f"Bearer {API_KEY}"},
    {"Authorization": f"bearer {API_KEY}"},
    {"x-api-key": "wrong-key-xxxxxxxx", "Authorization": f"Bearer {API_KEY}"},
], ids=["x-api-key", "bearer", "bearer-lowercase", "bearer-with-wrong-x-api-key"])
async def test_auth_accepted(api, headers):
    resp = await api.get("/version", headers=headers)
    assert resp.status == 200
    status, body = await post(api, "/query", {"textual_query": "anything", "entity_id": uid()}, headers=headers)
    assert status == 200 and body == []


@pytest.mark.parametrize("headers", [
    {},
    {"x-api-key": ""},
    {"x-api-key": "wrong-key-xxxxxxxx"},
    {"x-api-key": API_KEY[:-1]},
    {"x-api-key": API_KEY + "x"},
    {"Authorization": "Bearer wrong-key-xxxxxxxx"},
    {"Authorization": API_KEY},  # no scheme
    {"Authorization": f"Basic {API_KEY}"},
    {"Authorization": "Bearer "},
], ids=["missing", "empty", "wrong", "prefix", "longer", "bearer-wrong", "no-scheme", "basic", "bearer-empty"])
async def test_auth_rejected(api, headers):
    ent = uid()
    for method, path, body in [("GET", "/version", None), ("GET", "/stats", None),
                               ("POST", "/ingest", {"entity_id": ent, "textual_content": "should not be stored"}),
                               ("POST", "/query", {"textual_query": "x"}),
                               ("POST", "/memory/delete", {"memory_id": "x"})]:
        resp = await api.request(method, path, json=body, headers=headers)
        assert resp.content_type == "application/json"
        assert_error(resp.status, await resp.json(), 401, "unauthorized")
    # the rejected ingest stored nothing
    assert await query(api, "should not be stored", ent) == []


# ---- ingest and query -----------------------------------------------------------------------

async def test_ingest_then_query(api):
    ent = uid()
    acked = await ingest(api, ent, "The user's favourite programming language is Rust", kind="preference")
    await ingest(api, ent, "The user walks the dog every morning at seven")
    await ingest(api, ent, "The user is allergic to peanuts")
    hits = await query(api, "Which programming language does the user like?", ent)
    assert len(hits) == 3
    assert_ranked(hits)
    top = hits[0]
    assert top["memory_id"] == acked["memory_id"]
    assert top["textual_content"] == "The user's favourite programming language is Rust"
    assert set(top) == {"memory_id", "entity_id", "session_id", "turn_index", "created_at_ms", "similarity",
                        "textual_content", "kind"}
    assert top["kind"] == "preference" and hits[1]["kind"] is None
    assert all(h["entity_id"] == ent for h in hits)
    # /query is an alias of /query/semantic, `query`/`top_k` aliases of textual_query/limit
    status, alias = await post(api, "/query", {"query": "programming language", "top_k": 1, "entity_id": ent})
    assert status == 200 and [h["memory_id"] for h in alias] == [acked["memory_id"]]


async def test_ingest_accepts_sdk_payload(api):
    """The exact body the official SDK sends (text alias, nulls, SDK flags) is accepted."""
    ent = uid()
    mid = f"{ent}::sdk::{uuid.uuid4().hex}"
    status, body = await post(api, "/ingest", {
        "entity_id": ent, "memory_id": mid, "timestamp": 1700000000000, "text": "SDK payload memory",
        "relations": [], "kind": None, "enable_semantic_dedup": None, "enable_consolidation": None,
    })
    assert status == 201 and body["memory_id"] == mid
    status, mem = await inspect(api, mid)
    assert status == 200
    assert mem["created_at_ms"] == 1700000000000 and mem["textual_content"] == "SDK payload memory"


async def test_query_returns_min_of_limit_and_count(api):
    ent = uid()
    texts = [f"Memory number {i}: the user visited city {c}" for i, c in
             enumerate(["Paris", "Oslo", "Lima", "Cairo", "Quito", "Perth", "Seoul"])]
    await ingest_batch(api, [{"entity_id": ent, "textual_content": t} for t in texts])
    for limit, expected in [(1, 1), (3, 3), (7, 7), (8, 7), (50, 7), (1000, 7)]:
        hits = await query(api, "which city did the user visit", ent, limit=limit)
        assert len(hits) == expected, (limit, len(hits))
        assert_ranked(hits)
        assert len({h["memory_id"] for h in hits}) == expected
    # even a query that matches nothing lexically returns every memory of the entity
    assert len(await query(api, "zzqxv", ent, limit=50)) == 7
    # an entity with no memories returns an empty list
    assert await query(api, "which city", uid(), limit=5) == []


async def test_entity_isolation(api):
    a, b = uid("a"), uid("b")
    await ingest(api, a, "I enjoy hiking in the mountains on weekends")
    await ingest(api, b, "The quick brown fox jumps over the lazy dog")
    await ingest(api, b, "quick brown fox quick brown fox")
    hits = await query(api, "quick brown fox jumps over the lazy dog", a, limit=50)
    assert [h["entity_id"] for h in hits] == [a]
    assert "fox" not in hits[0]["textual_content"]
    hits_b = await query(api, "hiking in the mountains", b, limit=50)
    assert {h["entity_id"] for h in hits_b} == {b} and len(hits_b) == 2


async def test_exact_tokens_are_top_hit(api):
    ent = uid()
    distractors = [
        "Order ZX-99871 was shipped to Berlin on Monday",
        "Order ZX-19817 was cancelled by the customer",
        "Order QX-99817 is waiting for payment",
        "The customer asked about the status of an order",
        "Order ZX-89817 was delivered to Madrid",
        "The locker combination at the gym is 5582",
        "The office door code is 4417",
        "The user's phone ends in 7144",
    ]
    target_order = "Order ZX-99817 was shipped to Lisbon on Friday"
    target_number = "The locker combination at the pool is 4471"
    body = await ingest_batch(api, [{"entity_id": ent, "textual_content": t}
                                    for t in [*distractors, target_order, target_number]])
    ids = dict(zip([*distractors, target_order, target_number], body["memory_ids"]))
    hits = await query(api, "ZX-99817", ent, limit=5)
    assert hits[0]["memory_id"] == ids[target_order], [h["textual_content"] for h in hits]
    assert_ranked(hits)
    hits = await query(api, "where did order ZX-99817 ship?", ent, limit=5)
    assert hits[0]["memory_id"] == ids[target_order], [h["textual_content"] for h in hits]
    hits = await query(api, "4471", ent, limit=5)
    assert hits[0]["memory_id"] == ids[target_number], [h["textual_content"] for h in hits]


async def test_exact_token_in_a_session_beats_its_neighbours(api):
    """Turns share lexical windows with their neighbours; the turn that holds the token still wins."""
    ent = uid()
    for k in (0, 4, 9):
        session = f"chat{k}"
        items = [{"entity_id": ent, "memory_id": f"{ent}::{session}::{t}",
                  "textual_content": f"Order {'ZX-99817' if t == k else f'ZX-{10000 + t * 7919}'} left on day {t}"}
                 for t in range(10)]
        await ingest_batch(api, items)
        hits = await query(api, "ZX-99817", ent, limit=3)
        assert (hits[0]["session_id"], hits[0]["turn_index"]) == (session, k), hits
        await post(api, "/memory/delete", {"memory_id": f"{ent}::{session}::{k}"})


async def test_id_grammar(api):
    ent = uid()
    mid = f"{ent}::session-1::4"
    body = await ingest(api, ent, "turn four of session one", memory_id=mid)
    assert body["memory_id"] == mid
    status, mem = await inspect(api, mid)
    assert status == 200
    assert (mem["session_id"], mem["turn_index"], mem["entity_id"]) == ("session-1", 4, ent)
    hit = (await query(api, "turn four", ent))[0]
    assert (hit["memory_id"], hit["session_id"], hit["turn_index"]) == (mid, "session-1", 4)

    generated = (await ingest(api, ent, "a memory without an id"))["memory_id"]
    assert re.fullmatch(re.escape(ent) + r"::sdk::[0-9a-f]{32}", generated), generated
    status, mem = await inspect(api, generated)
    assert status == 200 and (mem["session_id"], mem["turn_index"]) == ("sdk", 0)

    plain = f"plain-{uuid.uuid4().hex}"  # any other string: no session, turn 0
    await ingest(api, ent, "a memory with a free-form id", memory_id=plain)
    status, mem = await inspect(api, plain)
    assert status == 200 and (mem["session_id"], mem["turn_index"], mem["entity_id"]) == ("", 0, ent)

    # turns that are not small whole numbers are no turn (0 on the wire), never an error
    for turn, expected in [("007", 7), ("abc", 0), ("-3", 0), ("\uff14", 0), ("9" * 40, 0)]:
        mid = f"{ent}::odd::{turn}"
        await ingest(api, ent, f"odd turn {turn}", memory_id=mid)
        status, mem = await inspect(api, mid)
        assert status == 200 and (mem["session_id"], mem["turn_index"]) == ("odd", expected), mem

    # a memory without a turn number has a window of its own
    status, mem = await inspect(api, generated, include_turn_window=True)
    assert [w["memory_id"] for w in mem["turn_window"]] == [generated]

    # timestamps are kept as sent, 0 and the maximum included
    for ts in (0, 253402300799999):
        mid = f"{ent}::ts::{ts % 1000}"
        await ingest(api, ent, "timestamped", memory_id=mid, timestamp=ts)
        status, mem = await inspect(api, mid)
        assert mem["created_at_ms"] == ts


async def test_upsert_replaces(api):
    ent = uid()
    mid = f"{ent}::s::1"
    await ingest(api, ent, "The cat is named Whiskers", memory_id=mid)
    await ingest(api, ent, "The dog is named Rex", memory_id=mid)
    hits = await query(api, "What is the cat's name? Whiskers", ent, limit=50)
    assert len(hits) == 1
    assert hits[0]["memory_id"] == mid and hits[0]["textual_content"] == "The dog is named Rex"
    status, mem = await inspect(api, mid)
    assert status == 200 and mem["textual_content"] == "The dog is named Rex"
    # the old text is gone from the full-text index too: a fan-out for its unique words finds nothing of it
    assert not [h for h in await query(api, "Whiskers", None, limit=50) if "Whiskers" in h["textual_content"]
                and h["entity_id"] == ent]
    # a batch that repeats an id keeps the last one
    await ingest_batch(api, [{"entity_id": ent, "memory_id": mid, "textual_content": "first"},
                             {"entity_id": ent, "memory_id": mid, "textual_content": "The parrot is named Kiwi"}])
    hits = await query(api, "parrot", ent, limit=50)
    assert [h["textual_content"] for h in hits] == ["The parrot is named Kiwi"]


async def test_reingest_under_another_entity_keeps_one_memory(api, cluster):
    """A memory id names one memory: re-ingesting it for another entity moves it, wherever the two
    entities live (the shard store already moves it when both entities share a shard)."""
    a, b = on_two_shards(cluster, "from", "to")
    mid = f"moved-{uuid.uuid4().hex}"
    await ingest(api, a, "first version of the moving memory kumquat", memory_id=mid)
    await ingest(api, b, "second version of the moving memory kumquat", memory_id=mid)
    same = [h for h in await query(api, "moving memory kumquat", None, limit=20) if h["memory_id"] == mid]
    assert [(h["entity_id"], h["textual_content"]) for h in same] == [
        (b, "second version of the moving memory kumquat")], "one memory id, stored twice"
    status, mem = await inspect(api, mid)
    assert status == 200 and mem["entity_id"] == b and mem["textual_content"].startswith("second")
    assert await query(api, "kumquat", a, limit=10) == []


async def test_grammar_ids_belong_to_the_entity_they_name(api, cluster):
    """`<entity>::<session>::<turn>` ids live in their entity's shard: another entity may not take them."""
    a, b = uid("home"), uid("away")
    mid = f"{a}::s::1"
    await ingest(api, a, "passport number of the user is X99887766", memory_id=mid)
    status, body = await post(api, "/ingest", {"entity_id": b, "textual_content": "moved", "memory_id": mid})
    assert_error(status, body, 422, "validation_error")
    assert "memory_id" in body["error"]["message"] and a in body["error"]["message"]
    status, body = await post(api, "/ingest/batch", {"items": [
        {"entity_id": b, "textual_content": "ok"},
        {"entity_id": b, "textual_content": "moved", "memory_id": mid}]})
    assert_error(status, body, 422, "validation_error")
    assert "items.1.memory_id" in body["error"]["message"]
    status, body = await inspect(api, mid)
    assert status == 200 and body["entity_id"] == a
    status, body = await post(api, "/memory/delete", {"memory_id": mid})
    assert status == 200 and body == {"deleted": True, "memory_id": mid}
    status, body = await inspect(api, mid)
    assert status == 404, f"deleted memory still inspectable: {body}"


async def test_delete_of_a_moved_free_form_id_leaves_nothing(api, cluster):
    """`deleted: true` means the id is gone everywhere, also after it moved between entities."""
    a, b = on_two_shards(cluster, "home", "away")
    mid = f"free-{uuid.uuid4().hex}"
    await ingest(api, a, "passport number of the user is X99887766", memory_id=mid)
    await ingest(api, b, "passport number of the user is X99887766 (moved)", memory_id=mid)
    status, body = await post(api, "/memory/delete", {"memory_id": mid})
    assert status == 200 and body == {"deleted": True, "memory_id": mid}
    status, body = await inspect(api, mid)
    assert status == 404, f"deleted memory still inspectable: {body}"
    left = [h for h in await query(api, "passport X99887766", None, limit=50) if h["memory_id"] == mid]
    assert left == [], "deleted memory still returned by queries"


async def test_stats(api):
    resp = await api.get("/stats")
    assert_error(resp.status, await resp.json(), 401, "unauthorized")
    ent = uid()
    await ingest(api, ent, "stats probe")
    # Vectors reach Chroma in batches once writes pause (node/indexer.py): wait for that.
    for _ in range(300):
        resp = await api.get("/stats", headers=AUTH)
        assert resp.status == 200
        body = await resp.json()
        if not any(n["unindexed"] for n in body["nodes"].values()):
            break
        await asyncio.sleep(0.1)
    assert body["shards"] == 8 and set(body["nodes"]) == {"node-0", "node-1"}
    nodes = list(body["nodes"].values())
    assert sum(n["shards_owned"] for n in nodes) == 8
    assert body["memories"] == sum(n["memories"] for n in nodes) >= 1
    assert body["entities"] == sum(n["entities"] for n in nodes) >= 1
    for n in nodes:
        assert n["vectors"] == n["memories"] and n["unindexed"] == 0, n


async def test_relations(api):
    ent = uid()
    mid = f"{ent}::rel::0"
    await ingest(api, ent, "Alice knows Bob and likes coffee", memory_id=mid,
                 relations=[["likes", "coffee"], ["alice", "knows", "bob"]])
    status, mem = await inspect(api, mid)
    assert status == 200
    assert mem["relations"] == [[ent, "likes", "coffee"], ["alice", "knows", "bob"]]
    # re-ingest replaces the relations
    await ingest(api, ent, "Alice knows Bob", memory_id=mid, relations=[["alice", "knows", "bob"]])
    status, mem = await inspect(api, mid)
    assert mem["relations"] == [["alice", "knows", "bob"]]
    for bad in ([["x"]], [["a", "b", "c", "d"]], [[]], [["a", ""]], "likes coffee", [["a", 1]]):
        status, body = await post(api, "/ingest", {"entity_id": ent, "textual_content": "bad relation",
                                                   "memory_id": f"{ent}::bad::0", "relations": bad})
        assert_error(status, body, 422, "validation_error")
        assert "relations" in body["error"]["message"]
    status, _ = await inspect(api, f"{ent}::bad::0")
    assert status == 404


async def test_batch_ingest(api):
    ent1, ent2 = uid(), uid()
    items = [{"entity_id": ent1 if i % 2 else ent2, "textual_content": f"batch memory {i} about topic t{i}x"}
             for i in range(40)]
    body = await ingest_batch(api, items)
    assert body["status"] == "ok" and body["ingested"] == 40 and len(body["memory_ids"]) == 40
    assert len(set(body["memory_ids"])) == 40
    for ent in (ent1, ent2):
        hits = await query(api, "batch memory", ent, limit=100)
        assert len(hits) == 20
    for i in (0, 7, 39):
        top = (await query(api, f"t{i}x", items[i]["entity_id"], limit=1))[0]
        assert top["memory_id"] == body["memory_ids"][i]

    assert await ingest_batch(api, []) == {"status": "ok", "ingested": 0, "memory_ids": [], "duplicates": {}}

    ent3 = uid()
    too_many = [{"entity_id": ent3, "textual_content": f"m{i}"} for i in range(1001)]
    status, err = await post(api, "/ingest/batch", {"items": too_many})
    assert_error(status, err, 422, "validation_error")
    assert "1000" in err["error"]["message"]
    assert await query(api, "m1", ent3) == []
    exactly = await ingest_batch(api, too_many[:1000])
    assert exactly["ingested"] == 1000

    # one invalid item rejects the whole batch and names it
    ent4 = uid()
    status, err = await post(api, "/ingest/batch", {"items": [
        {"entity_id": ent4, "textual_content": "fine"}, {"entity_id": ent4, "textual_content": "  "}]})
    assert_error(status, err, 422, "validation_error")
    assert "items.1" in err["error"]["message"]
    assert await query(api, "fine", ent4) == []


async def test_inspect_turn_window(api):
    ent = uid()
    items = [{"entity_id": ent, "memory_id": f"{ent}::s1::{t}", "textual_content": f"session one turn {t}"}
             for t in range(10)]
    items += [{"entity_id": ent, "memory_id": f"{ent}::s2::{t}", "textual_content": f"session two turn {t}"}
              for t in range(10)]
    other = uid()
    items += [{"entity_id": other, "memory_id": f"{other}::s1::{t}", "textual_content": f"other turn {t}"}
              for t in range(10)]
    await ingest_batch(api, items)

    status, mem = await inspect(api, f"{ent}::s1::5", include_turn_window=True, turn_window_radius=2)
    assert status == 200
    window = mem["turn_window"]
    assert [w["memory_id"] for w in window] == [f"{ent}::s1::{t}" for t in (3, 4, 5, 6, 7)]
    assert all(w["entity_id"] == ent and w["session_id"] == "s1" for w in window)

    status, mem = await inspect(api, f"{ent}::s1::0", include_turn_window=True, turn_window_radius=1)
    assert [w["turn_index"] for w in mem["turn_window"]] == [0, 1]
    status, mem = await inspect(api, f"{ent}::s2::9", include_turn_window=True, turn_window_radius=0)
    assert [w["memory_id"] for w in mem["turn_window"]] == [f"{ent}::s2::9"]
    status, mem = await inspect(api, f"{ent}::s2::4", include_turn_window=True)  # default radius 2
    assert [w["turn_index"] for w in mem["turn_window"]] == [2, 3, 4, 5, 6]
    status, mem = await inspect(api, f"{ent}::s1::5")
    assert status == 200 and "turn_window" not in mem
    for radius in (-1, 101, "2"):
        status, body = await inspect(api, f"{ent}::s1::5", include_turn_window=True, turn_window_radius=radius)
        assert_error(status, body, 422, "validation_error")


async def test_delete(api):
    ent = uid()
    keep = (await ingest(api, ent, "The user keeps bees in the garden"))["memory_id"]
    gone = (await ingest(api, ent, "The user's passport number is P1234567"))["memory_id"]
    status, body = await post(api, "/memory/delete", {"memory_id": gone, "reason": "user request"})
    assert status == 200 and body == {"deleted": True, "memory_id": gone}
    hits = await query(api, "passport number P1234567", ent, limit=50)
    assert [h["memory_id"] for h in hits] == [keep]
    assert not [h for h in await query(api, "P1234567", None, limit=50) if h["memory_id"] == gone]
    status, body = await inspect(api, gone)
    assert_error(status, body, 404, "not_found")
    status, body = await post(api, "/memory/delete", {"memory_id": gone})
    assert status == 200 and body == {"deleted": False, "memory_id": gone}
    status, _ = await inspect(api, keep)
    assert status == 200
    # deleting an id that never existed, and one without an entity prefix
    for mid in (f"{ent}::sdk::{uuid.uuid4().hex}", f"nothing-{uuid.uuid4().hex}"):
        status, body = await post(api, "/memory/delete", {"memory_id": mid})
        assert status == 200 and body == {"deleted": False, "memory_id": mid}


async def test_inspect_unknown(api):
    for mid in (f"{uid()}::s::1", f"no-such-{uuid.uuid4().hex}"):
        status, body = await inspect(api, mid)
        assert_error(status, body, 404, "not_found")
        assert mid in body["error"]["message"]


async def test_query_fan_out(api, cluster):
    # entities that live on both nodes
    token = f"fan{uuid.uuid4().hex[:8]}q"
    ents: dict[str, list[str]] = {"node-0": [], "node-1": []}
    while min(len(v) for v in ents.values()) < 2:
        e = uid("fan")
        node = cluster.placement.node_of(e)
        if len(ents[node]) < 2:
            ents[node].append(e)
    all_ents = [e for v in ents.values() for e in v]
    phrases = ["lighthouse keeper", "river otter", "mountain goat", "desert fox"]
    items = [{"entity_id": e, "textual_content": f"{token} {p}"} for e, p in zip(all_ents, phrases)]
    ids = (await ingest_batch(api, items))["memory_ids"]

    hits = await query(api, token, None, limit=10)
    assert_ranked(hits)
    found = [h for h in hits if h["memory_id"] in ids]
    assert {h["entity_id"] for h in found} == set(all_ents)
    assert {h["memory_id"] for h in hits[:4]} == set(ids)  # the unique token beats everything else

    hits = await query(api, f"{token} river otter", None, limit=3)
    assert len(hits) == 3
    assert_ranked(hits)
    assert hits[0]["memory_id"] == ids[1]
    assert {h["memory_id"] for h in hits} <= set(ids)
    # the entity-scoped query sees only its own
    assert [h["memory_id"] for h in await query(api, token, all_ents[0], limit=10)] == [ids[0]]


async def test_unicode_round_trip(api):
    ent = f"用户-🙂-é-{uuid.uuid4().hex[:8]}"
    texts = {
        "emoji": "My favourite fruit is 🍓 and I ❤️ pizza 🍕",
        "cjk": "我喜欢在周末去东京吃寿司",
        "accents": "Ma recette préférée est la crème brûlée de Zoë à Besançon",
        "mixed": "Ünïcödé façade naïve café — ½ ∑ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    }
    ids = {}
    for key, text in texts.items():
        ids[key] = (await ingest(api, ent, text, memory_id=f"{ent}::ü-session::{len(ids)}"))["memory_id"]
    for key, text in texts.items():
        status, mem = await inspect(api, ids[key])
        assert status == 200
        assert mem["textual_content"] == text and mem["entity_id"] == ent and mem["session_id"] == "ü-session"
        hits = await query(api, text, ent, limit=4)
        assert hits[0]["memory_id"] == ids[key]
        assert hits[0]["textual_content"] == text and hits[0]["entity_id"] == ent
        assert len(hits) == 4
    # diacritics are folded for full-text search
    hits = await query(api, "creme brulee Besancon", ent, limit=1)
    assert hits[0]["memory_id"] == ids["accents"]
    hits = await query(api, "🍓 pizza 🍕", ent, limit=1)  # emoji in a query do not break it
    assert hits[0]["memory_id"] == ids["emoji"]


# ---- malformed requests ---------------------------------------------------------------------

ENT = "malformed-entity"
GOOD = {"entity_id": ENT, "textual_content": "valid text"}

MALFORMED = [
    # id, method, path, raw body (bytes) or JSON-able, expected status
    ("invalid-json", "POST", "/ingest", b'{"entity_id": "x", ', 400),
    ("json-array", "POST", "/ingest", b'[{"entity_id": "x", "textual_content": "y"}]', 422),
    ("json-string", "POST", "/query", b'"hello"', 422),
    ("json-null", "POST", "/query", b"null", 422),
    ("empty-body", "POST", "/ingest", b"", 400),
    ("empty-body-query", "POST", "/query/semantic", b"", 400),
    ("non-utf8", "POST", "/ingest", b'{"entity_id": "x", "textual_content": "\xff\xfe\xfa"}', 400),
    ("lone-surrogate", "POST", "/ingest", b'{"entity_id": "x", "textual_content": "bad \\ud800 text"}', 400),
    ("lone-surrogate-id", "POST", "/memory/inspect", b'{"memory_id": "\\udfff"}', 400),
    ("deeply-nested", "POST", "/ingest", b"[" * 100000 + b"]" * 100000, 400),
    ("missing-entity-id", "POST", "/ingest", {"textual_content": "x"}, 422),
    ("entity-id-int", "POST", "/ingest", {"entity_id": 123, "textual_content": "x"}, 422),
    ("entity-id-null", "POST", "/ingest", {"entity_id": None, "textual_content": "x"}, 422),
    ("entity-id-empty", "POST", "/ingest", {"entity_id": "", "textual_content": "x"}, 422),
    ("entity-id-control-char", "POST", "/ingest", {"entity_id": "a\nb", "textual_content": "x"}, 422),
    ("entity-id-too-long", "POST", "/ingest", {"entity_id": "e" * 513, "textual_content": "x"}, 422),
    ("missing-text", "POST", "/ingest", {"entity_id": ENT}, 422),
    ("blank-text", "POST", "/ingest", {"entity_id": ENT, "textual_content": " \t\n "}, 422),
    ("empty-text", "POST", "/ingest", {"entity_id": ENT, "textual_content": ""}, 422),
    ("text-not-string", "POST", "/ingest", {"entity_id": ENT, "textual_content": ["a"]}, 422),
    ("timestamp-string", "POST", "/ingest", {**GOOD, "timestamp": "1700000000000"}, 422),
    ("timestamp-negative", "POST", "/ingest", {**GOOD, "timestamp": -1}, 422),
    ("timestamp-float", "POST", "/ingest", {**GOOD, "timestamp": 1.5}, 422),
    ("timestamp-bool", "POST", "/ingest", {**GOOD, "timestamp": True}, 422),
    ("timestamp-huge", "POST", "/ingest", {**GOOD, "timestamp": 10 ** 20}, 422),
    ("memory-id-empty", "POST", "/ingest", {**GOOD, "memory_id": ""}, 422),
    ("kind-too-long", "POST", "/ingest", {**GOOD, "kind": "k" * 65}, 422),
    ("limit-0", "POST", "/query/semantic", {"textual_query": "x", "limit": 0}, 422),
    ("limit-negative", "POST", "/query/semantic", {"textual_query": "x", "limit": -1}, 422),
    ("limit-huge", "POST", "/query/semantic", {"textual_query": "x", "limit": 100000}, 422),
    ("limit-string", "POST", "/query/semantic", {"textual_query": "x", "limit": "5"}, 422),
    ("limit-float", "POST", "/query/semantic", {"textual_query": "x", "limit": 5.0}, 422),
    ("query-missing", "POST", "/query/semantic", {"entity_id": ENT, "limit": 5}, 422),
    ("query-blank", "POST", "/query/semantic", {"textual_query": "   "}, 422),
    ("query-entity-empty", "POST", "/query/semantic", {"textual_query": "x", "entity_id": ""}, 422),
    ("window-yes", "POST", "/memory/inspect", {"memory_id": "a::b::1", "include_turn_window": "yes"}, 422),
    ("inspect-no-id", "POST", "/memory/inspect", {}, 422),
    ("delete-id-int", "POST", "/memory/delete", {"memory_id": 5}, 422),
    ("items-not-list", "POST", "/ingest/batch", {"items": {"entity_id": ENT, "textual_content": "x"}}, 422),
    ("items-missing", "POST", "/ingest/batch", {}, 422),
    ("items-of-strings", "POST", "/ingest/batch", {"items": ["x"]}, 422),
    ("unknown-route", "POST", "/nope", {"a": 1}, 404),
    ("unknown-route-get", "GET", "/v2/health", None, 404),
    ("get-on-ingest", "GET", "/ingest", None, 405),
    ("put-on-query", "PUT", "/query", {"textual_query": "x"}, 405),
    ("post-on-health", "POST", "/health", {}, 405),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_malformed_requests(api, case):
    _, method, path, body, expected = case
    headers = dict(AUTH)
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        resp = await api.request(method, path, data=body, headers=headers)
    else:
        resp = await api.request(method, path, json=body, headers=headers)
    assert resp.status < 500
    assert resp.content_type == "application/json", (resp.status, await resp.text())
    assert_error(resp.status, await resp.json(), expected)


async def test_malformed_ingest_stores_nothing(api):
    ent = uid()
    for bad in ({"entity_id": ent, "textual_content": "  "}, {"entity_id": ent, "textual_content": "x", "timestamp": -5},
                {"entity_id": ent, "textual_content": "x", "relations": [["only-one"]]}):
        status, body = await post(api, "/ingest", bad)
        assert_error(status, body, 422, "validation_error")
    assert await query(api, "x", ent, limit=10) == []


async def test_body_too_large(api):
    ent = uid()
    big = b'{"entity_id": "' + ent.encode() + b'", "textual_content": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    assert len(big) > 10 * 1024 * 1024
    resp = await api.post("/ingest", data=big, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(resp.status, await resp.json(), 413, "payload_too_large")

    async def chunks():  # no Content-Length: the limit must hold while streaming too
        for i in range(0, len(big), 1024 * 1024):
            yield big[i:i + 1024 * 1024]

    resp = await api.post("/ingest", data=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert_error(resp.status, await resp.json(), 413, "payload_too_large")
    # a body under the size limit gets through to validation (and fails there for the text length)
    status, body = await post(api, "/ingest", {"entity_id": ent, "textual_content": "b" * 1_000_001})
    assert_error(status, body, 422, "validation_error")
    assert await query(api, "a", ent) == []



async def test_concurrent_requests_are_merged_into_fewer_node_calls(api):
    """router/coalesce.py: under concurrency one Ray call carries many requests, each answered alone."""

    async def merged() -> tuple[int, int]:
        resp = await api.get("/stats", headers=AUTH)
        m = (await resp.json())["router"]["merged"]
        return sum(v["calls"] for v in m.values()), sum(v["requests"] for v in m.values())

    ents = [uid("merge") for _ in range(40)]
    calls0, requests0 = await merged()
    await asyncio.gather(*(ingest(api, e, f"my lucky number is {i}") for i, e in enumerate(ents)))
    hits = await asyncio.gather(*(query(api, "lucky number", e) for e in ents))
    assert [h[0]["textual_content"] for h in hits] == [f"my lucky number is {i}" for i in range(40)]
    calls, requests = await merged()
    assert requests - requests0 == 80
    assert calls - calls0 < 80, "no request shared a node call"
