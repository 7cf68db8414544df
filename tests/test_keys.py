"""Scoped API keys, roles, rate limits and the audit trail, through the HTTP API on the real session
cluster (in-process router with a keys file of its own)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import pytest

from conftest import API_KEY
from router import keys


@pytest.fixture
async def tenants(aiohttp_client, cluster, tmp_path):
    """An app with a keys file: acme (write, 'acme:'), globex (write, 'globex:'), reader (read, 'acme:'),
    limited (read, 2 requests/s, burst 2); and the default key as admin."""
    from router.app import create_app

    path = tmp_path / "keys.yaml"
    secrets = {
        "acme": keys.add(path, keys.Key("acme", "write", ("acme:",))),
        "globex": keys.add(path, keys.Key("globex", "write", ("globex:",))),
        "reader": keys.add(path, keys.Key("reader", "read", ("acme:",))),
        "limited": keys.add(path, keys.Key("limited", "read", (), rate=2.0, burst=2)),
    }
    config = dataclasses.replace(cluster.config, keys_file=str(path), audit_file=str(tmp_path / "audit.log"))
    client = await aiohttp_client(create_app(config, cluster))
    run = uuid.uuid4().hex[:8]
    return client, secrets, path, tmp_path / "audit.log", run


async def call(client, key: str, path: str, body=None, method: str = "POST"):
    resp = await client.request(method, path, json=body, headers={"x-api-key": key})
    text = await resp.text()
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    return resp.status, data, resp.headers


async def test_a_scoped_key_cannot_touch_another_tenants_entities(tenants):
    client, k, _, _, run = tenants
    acme, globex = f"acme:{run}", f"globex:{run}"
    assert (await call(client, k["acme"], "/ingest", {"entity_id": acme, "textual_content": "acme roadmap secret"}))[0] == 201
    assert (await call(client, k["globex"], "/ingest", {"entity_id": globex,
                                                       "textual_content": "globex roadmap secret"}))[0] == 201
    for path, body in [("/query", {"textual_query": "roadmap", "entity_id": globex}),
                       ("/ingest", {"entity_id": globex, "textual_content": "x"}),
                       ("/entity/export", {"entity_id": globex}),
                       ("/entity/erase", {"entity_id": globex}),
                       ("/analytics/query", {"entity_id": globex, "label": "x"}),
                       ("/graph/query", {"subject": "x"}),  # a scoped key must name its entity
                       ("/memory/inspect", {"memory_id": f"{globex}::s::1"})]:
        status, body_, _ = await call(client, k["acme"], path, body)
        assert status == 403 and body_["error"]["code"] == "forbidden", (path, status, body_)
    status, body, _ = await call(client, k["acme"], f"/profile?entity_id={globex}", method="GET")
    assert status == 403
    status, hits, _ = await call(client, k["acme"], "/query", {"textual_query": "roadmap secret", "limit": 1000})
    assert status == 200 and hits and all(h["entity_id"].startswith("acme:") for h in hits), hits
    # a free-form id of another tenant reads as absent, and is not deleted
    free = f"free-{run}"
    assert (await call(client, k["globex"], "/ingest", {"entity_id": globex, "memory_id": free,
                                                       "textual_content": "globex private"}))[0] == 201
    assert (await call(client, k["acme"], "/memory/inspect", {"memory_id": free}))[0] == 404
    assert (await call(client, k["acme"], "/memory/delete", {"memory_id": free}))[1]["deleted"] is False
    assert (await call(client, k["globex"], "/memory/inspect", {"memory_id": free}))[0] == 200


async def test_roles_nest(tenants):
    client, k, _, _, run = tenants
    status, body, _ = await call(client, k["reader"], "/ingest", {"entity_id": f"acme:{run}", "textual_content": "x"})
    assert status == 403 and "needs 'write'" in body["error"]["message"]
    assert (await call(client, k["reader"], "/query", {"textual_query": "x", "entity_id": f"acme:{run}"}))[0] == 200
    assert (await call(client, k["acme"], "/stats", method="GET"))[0] == 403  # admin only
    assert (await call(client, k["acme"], "/admin/shards", method="GET"))[0] == 403
    assert (await call(client, API_KEY, "/stats", method="GET"))[0] == 200  # the configured key is admin


async def test_a_revoked_key_is_refused_without_a_restart(tenants):
    client, k, path, _, run = tenants
    assert (await call(client, k["globex"], "/query", {"textual_query": "x", "entity_id": f"globex:{run}"}))[0] == 200
    keys.revoke(path, "globex")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, _, _ = await call(client, k["globex"], "/query", {"textual_query": "x", "entity_id": f"globex:{run}"})
        if status == 401:
            break
        await asyncio.sleep(0.2)
    assert status == 401
    assert (await call(client, k["acme"], "/query", {"textual_query": "x", "entity_id": f"acme:{run}"}))[0] == 200


async def test_the_rate_limit_answers_429_and_recovers(tenants):
    client, k, _, _, run = tenants
    body = {"textual_query": "x", "entity_id": f"any:{run}"}
    statuses = [(await call(client, k["limited"], "/query", body))[:3:2] for _ in range(4)]
    assert [s for s, _ in statuses[:2]] == [200, 200]
    limited = [(s, h) for s, h in statuses if s == 429]
    assert limited and int(limited[0][1]["Retry-After"]) >= 1
    await asyncio.sleep(1.1)
    assert (await call(client, k["limited"], "/query", body))[0] == 200
    metrics = (await call(client, API_KEY, "/metrics", method="GET"))[1]
    assert 'tellodb_key_requests_total{key="limited",outcome="rate_limited"}' in metrics
    assert k["limited"] not in metrics  # counted by name, never by key


async def test_wrong_keys_from_one_client_slow_down(tenants):
    client, _, _, _, _ = tenants
    for _ in range(6):
        assert (await call(client, "wrong-key-123", "/query", {"textual_query": "x"}))[0] == 401
    started = time.monotonic()
    assert (await call(client, "wrong-key-123", "/query", {"textual_query": "x"}))[0] == 401
    assert time.monotonic() - started >= 0.2  # the 7th wrong key within a minute waits 0.4 s


async def test_the_audit_trail_records_an_erase_with_the_keys_name(tenants):
    client, k, _, audit, run = tenants
    entity = f"acme:{run}-audit"
    assert (await call(client, k["acme"], "/ingest", {"entity_id": entity,
                                                     "textual_content": "zebracorn audit text"}))[0] == 201
    assert (await call(client, k["acme"], "/entity/erase", {"entity_id": entity}))[0] == 200
    assert (await call(client, k["acme"], "/entity/erase", {"entity_id": f"globex:{run}"}))[0] == 403
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    erase = [e for e in lines if e["action"] == "erase" and e.get("entity_id") == entity]
    assert erase and erase[0]["key"] == "acme" and erase[0]["outcome"] == 200 and erase[0]["time"]
    assert "zebracorn" not in audit.read_text()
