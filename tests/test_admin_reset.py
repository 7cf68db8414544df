"""POST /admin/reset (the upstream engine's reset of all data) through a real `tellodb serve` of its
own: refused without the admin key or without `{"confirm": "delete-all-data"}`, and with both every
entity is erased on every node, and the audit trail says who did it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from conftest import API_KEY, http_json
from router import keys


def call(base: str, path: str, body: object, key: str | None) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a POST with `key` (None: no key)."""
    headers = {"content-type": "application/json", **({"x-api-key": key} if key else {})}
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def hits(base: str, entity: str) -> list[dict]:
    status, found = http_json(base, "/query/semantic", {"textual_query": "garden notes", "entity_id": entity,
                                                        "limit": 100})
    assert status == 200, found
    return found


def test_a_reset_needs_the_admin_key_and_the_confirmation_then_erases_everything(make_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    writer = keys.add(data / "keys.yaml", keys.Key("writer", "write"))
    server = make_server(data_dir=data, TELLODB_NODES="2").start()
    base = server.base_url
    entities = [f"reset:user-{i}" for i in range(6)]  # over both nodes' shards
    items = [{"entity_id": e, "memory_id": f"{e}::s::{j}", "textual_content": f"garden notes {j} of {e}: 3 km walk",
              "relations": [["likes", "tulips"]]} for e in entities for j in range(3)]
    assert http_json(base, "/ingest/batch", {"items": items})[0] == 201
    free = {"entity_id": entities[0], "memory_id": "a-free-form-id", "textual_content": "garden notes, free form"}
    assert http_json(base, "/ingest", free)[0] == 201

    confirmed = {"confirm": "delete-all-data", "clear_embedding_cache": True}  # the upstream bench's body
    assert call(base, "/admin/reset", confirmed, None)[0] == 401
    status, err, _ = call(base, "/admin/reset", confirmed, writer)
    assert status == 403 and "needs 'admin'" in err["error"]["message"], err
    for body in ({}, {"confirm": "delete-all"}, {"clear_embedding_cache": True}):
        status, err, _ = call(base, "/admin/reset", body, API_KEY)
        assert status == 400 and err["error"]["code"] == "bad_request", (body, err)
    assert call(base, "/admin/reset", {"confirm": 1}, API_KEY)[0] == 422
    assert all(len(hits(base, e)) == (4 if e == entities[0] else 3) for e in entities)  # nothing erased yet

    status, body, headers = call(base, "/admin/reset", confirmed, API_KEY)
    assert status == 200, body
    assert body["reset"] is True and body["entities"] == 6 and body["memories"] == 19, body
    assert body["relations"] == 18 and body["measurements"] >= 18, body  # "3 km" in each text, and maybe more
    assert int(headers["x-tm-total-us"]) > 0 and "total;dur=" in headers["Server-Timing"]
    assert all(hits(base, e) == [] for e in entities)
    status, stats = http_json(base, "/stats")
    assert status == 200 and stats["memories"] == 0 and stats["entities"] == 0 and stats["edges"] == 0, stats
    assert http_json(base, "/memory/inspect", {"memory_id": "a-free-form-id"})[0] == 404
    assert http_json(base, "/profile?entity_id=reset:user-1")[0] == 404
    # an alias, on an empty engine: nothing to erase
    assert call(base, "/v1/admin/reset", confirmed, API_KEY)[1] == {"reset": True, "entities": 0, "memories": 0,
                                                                   "relations": 0, "measurements": 0}
    # the engine keeps working
    assert http_json(base, "/ingest", {"entity_id": "after", "textual_content": "garden notes again"})[0] == 201
    assert [h["entity_id"] for h in hits(base, "after")] == ["after"]

    lines = [json.loads(line) for line in (data / "audit.log").read_text().splitlines()]
    resets = [(e["key"], e["outcome"], e.get("entities")) for e in lines if e["action"] == "reset"]
    assert resets == [("default", 400, None)] * 3 + [("default", 200, 6), ("default", 200, 0)], resets
    assert "garden" not in (data / "audit.log").read_text()  # never memory text
    assert server.stop() == 0
