"""The upstream engine's wire beyond the SDK (tellodb/tellodb, src/api/handlers): its statuses and its
other paths, through the HTTP API on the real session cluster."""

from __future__ import annotations

import uuid

from conftest import API_KEY

AUTH = {"x-api-key": API_KEY}


def uid(prefix: str = "wire") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def post(api, path: str, body, headers=AUTH):
    resp = await api.post(path, json=body, headers=headers)
    return resp.status, await resp.json()


async def test_ingest_and_batch_ingest_answer_201_created(api):
    ent = uid()
    status, body = await post(api, "/ingest", {"entity_id": ent, "textual_content": "a created memory"})
    assert status == 201, body
    assert body["status"] == "ok" and body["entity_id"] == ent
    status, body = await post(api, "/ingest/batch", {"items": [{"entity_id": ent, "textual_content": "one"},
                                                               {"entity_id": ent, "textual_content": "two"}]})
    assert status == 201 and body["ingested"] == 2, body
    spec = await (await api.get("/openapi.json")).json()
    for path in ("/ingest", "/ingest/batch"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "201" in responses and "200" not in responses, (path, responses)
        assert responses["201"]["description"] == "Created"


async def test_healthz_is_open(api):
    resp = await api.get("/healthz")  # no key, as the upstream's probe
    assert resp.status == 200 and await resp.json() == {"status": "ok"}


async def test_batch_ingest_takes_the_upstream_body(api):
    ent = uid()
    items = [{"entity_id": ent, "memory_id": f"{ent}::s::{i}", "timestamp": 1774719750000 + i * 1000,
              "textual_content": f"batch-ingest alias memory {i}", "relations": []} for i in range(3)]
    status, body = await post(api, "/batch-ingest", {"items": items})
    assert status == 201 and body["ingested"] == 3 and body["memory_ids"] == [i["memory_id"] for i in items], body
    resp = await api.post("/batch-ingest", json={"items": items}, headers={})
    assert resp.status == 401  # a write route, like /ingest/batch


async def test_v1_memory_routes_are_the_memory_routes(api):
    ent = uid()
    mid = f"{ent}::s::0"
    assert (await post(api, "/ingest", {"entity_id": ent, "memory_id": mid, "textual_content": "a v1 memory"}))[0] == 201
    status, found = await post(api, "/v1/memory/inspect", {"memory_id": mid})
    assert status == 200 and found["memory_id"] == mid and found["textual_content"] == "a v1 memory", found
    status, body = await post(api, "/v1/memory/delete", {"memory_id": mid, "reason": "v1"})
    assert status == 200 and body == {"deleted": True, "memory_id": mid}
    assert (await post(api, "/v1/memory/inspect", {"memory_id": mid}))[0] == 404
    assert (await post(api, "/memory/inspect", {"memory_id": mid}))[0] == 404


async def test_every_reset_path_needs_the_admin_key_and_the_confirmation(api):
    """Refusals only: the session cluster's data is shared (tests/test_admin_reset.py resets a server of its own)."""
    for path in ("/admin/reset", "/v1/admin/reset", "/reset"):
        resp = await api.post(path, json={"confirm": "delete-all-data"})
        assert resp.status == 401, path
        for body in ({}, {"confirm": "yes"}, {"confirm": None}, {"clear_embedding_cache": True}):
            status, err = await post(api, path, body)
            assert status == 400 and err["error"]["code"] == "bad_request", (path, body, err)
            assert "delete-all-data" in err["error"]["message"]


async def test_the_openapi_document_lists_the_upstream_paths(api):
    spec = await (await api.get("/openapi.json")).json()
    for path, method, original in (("/healthz", "get", "/health"), ("/batch-ingest", "post", "/ingest/batch"),
                                   ("/v1/memory/inspect", "post", "/memory/inspect"),
                                   ("/v1/memory/delete", "post", "/memory/delete"),
                                   ("/v1/admin/reset", "post", "/admin/reset"), ("/reset", "post", "/admin/reset")):
        assert spec["paths"][path][method]["description"] == f"Alias of {original}.", path
    reset = spec["paths"]["/admin/reset"]["post"]
    assert {"200", "400", "401", "403"} <= set(reset["responses"]), reset["responses"]
    assert "x-tm-total-us" in reset["responses"]["200"]["headers"]
