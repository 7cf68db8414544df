"""MCP for agents at /mcp, driven by the official MCP SDK's own client against a real `tellodb serve`:
tools listed, a memory stored and recalled, scopes enforced like the HTTP routes'."""

from __future__ import annotations

import json

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from router import keys


def payload(result) -> object:
    assert not result.is_error, result
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if isinstance(content, dict) else content
    return json.loads(result.content[0].text)


async def connect(base: str, key: str):
    http = httpx2.AsyncClient(headers={"x-api-key": key}, timeout=60)
    return http, Client(streamable_http_client(f"{base}/mcp", http_client=http))


async def test_an_mcp_client_stores_and_recalls_a_memory_within_its_scope(make_server, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    acme = keys.add(keys_file, keys.Key("acme-agent", "write", ("acme:",)))
    server = make_server(TELLODB_KEYS_FILE=str(keys_file)).start()
    http, client = await connect(server.base_url, acme)
    async with http, client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"remember", "recall", "forget", "profile", "analytics"}
        stored = payload(await client.call_tool("remember", {
            "entity_id": "acme:ada", "text": "Ada's locker code is 4471-B", "timestamp_ms": 1_700_000_000_000}))
        assert stored["stored"] is True and stored["memory_id"].startswith("acme:ada::")
        hits = payload(await client.call_tool("recall", {"query": "what is the locker code", "entity_id": "acme:ada"}))
        assert hits[0]["memory_id"] == stored["memory_id"] and "4471-B" in hits[0]["textual_content"]
        windowed = payload(await client.call_tool("recall", {"query": "locker code", "entity_id": "acme:ada",
                                                             "window_end_ms": 1_600_000_000_000}))
        assert windowed == []  # the memory is from 2023: outside a window that ends in 2020
        spent = payload(await client.call_tool("remember", {"entity_id": "acme:ada", "text": "Spent $12 on lunch"}))
        assert spent["stored"]
        total = payload(await client.call_tool("analytics", {"entity_id": "acme:ada", "label": "money_usd"}))
        assert total["sum"] == 12.0
        refused = await client.call_tool("remember", {"entity_id": "globex:bob", "text": "not ours"})
        assert refused.is_error and "acme:" in refused.content[0].text
        gone = payload(await client.call_tool("forget", {"memory_id": stored["memory_id"]}))
        assert gone["deleted"] is True
    http, client = await connect(server.base_url, "wrong-key-0000")
    refused = None
    async with http:
        try:
            async with client:
                await client.list_tools()
        except BaseException as exc:  # noqa: BLE001 - the SDK reports the refusal as an error group
            refused = exc
        answer = await http.post(f"{server.base_url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                 headers={"accept": "application/json, text/event-stream"})
    assert refused is not None, "a wrong key reached the MCP tools"
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"
