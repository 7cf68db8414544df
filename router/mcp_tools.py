"""MCP tools for agents at /mcp (Streamable HTTP, the official `mcp` SDK), behind the same keys and scopes.

Tools: `remember` (store a memory), `recall` (best memories for a question, optionally within a time
window), `forget` (delete a memory), `profile` (an entity's current facts and recent memories) and
`analytics` (exact aggregates of a measurement). Each checks the calling key (sent as `x-api-key` or
`Authorization: Bearer`, as on every other route) against the tool's role and the key's entity
prefixes, and validates its arguments with the same models and limits as the HTTP routes. The
server is stateless (each request stands alone, JSON answers), so any router can take any call.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings

from router import access, tuning
from router.errors import ApiError
from router.handlers import finite, to_item
from router.http import AUDIT, CLUSTER, CONFIG
from router.keys import Key
from router.limits import check_ingest
from router.schemas import AnalyticsRequest, IngestRequest, QueryRequest, parse

INSTRUCTIONS = ("Long-term memory for the user (entity) you serve. Call `recall` with the user's question "
                "before you answer, `remember` for each new fact the user tells you, `forget` when asked to.")


def build(http: web.Application):
    """The MCP SDK's ASGI app with the engine's tools, for `router.asgi.AsgiMount`."""
    server = MCPServer(name="tellodb", instructions=INSTRUCTIONS)
    cluster = http[CLUSTER]

    def caller(ctx: Context, role: str, entity_id: str | None = None) -> Key:
        headers = ctx.headers or {}
        offered = [headers.get("x-api-key", "")]
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        key = http[access.KEYRING].identify([o for o in offered if o])
        if key is None:
            raise ToolError("missing or wrong API key")
        if not key.may(role):
            raise ToolError(f"key {key.name!r} has role {key.role!r}; this tool needs {role!r}")
        if entity_id is not None and not key.covers(entity_id):
            raise ToolError(f"key {key.name!r} may only touch entities starting with {', '.join(key.prefixes)}")
        return key

    def valid(model, data: dict[str, Any]):
        try:
            return parse(model, {k: v for k, v in data.items() if v is not None})
        except ApiError as exc:
            raise ToolError(f"{exc.code}: {exc.message}") from None

    async def run(coro) -> Any:
        try:
            return await coro
        except ApiError as exc:  # validation, limits, unavailable nodes: the tool's error says it
            raise ToolError(f"{exc.code}: {exc.message}") from None

    @server.tool(description="Store a memory about an entity (a user). Give memory_id to make a retry an update.")
    async def remember(entity_id: str, text: str, ctx: Context, memory_id: str | None = None,
                       timestamp_ms: int | None = None, fact_key: str | None = None) -> dict[str, Any]:
        caller(ctx, "write", entity_id)
        req = valid(IngestRequest, {"entity_id": entity_id, "textual_content": text, "memory_id": memory_id,
                                    "timestamp": timestamp_ms, "fact_key": fact_key})
        try:
            check_ingest(http[CONFIG], [req])
        except ApiError as exc:
            raise ToolError(f"{exc.code}: {exc.message}") from None
        item = to_item(req)
        [duplicate_of] = await run(cluster.ingest([item]))
        return {"memory_id": item.memory_id, "stored": duplicate_of is None, "duplicate_of": duplicate_of}

    @server.tool(description="The memories that best answer a question, best first; optionally only those created "
                             "between window_start_ms and window_end_ms (ms since the epoch).")
    async def recall(query: str, ctx: Context, entity_id: str | None = None, limit: int = 5,
                     window_start_ms: int | None = None, window_end_ms: int | None = None) -> list[dict[str, Any]]:
        key = caller(ctx, "read", entity_id)
        req = valid(QueryRequest, {"textual_query": query, "limit": limit, "entity_id": entity_id})
        window = None if window_start_ms is None and window_end_ms is None else (window_start_ms, window_end_ms)
        hits = await run(cluster.query(req.textual_query, req.entity_id, min(req.limit, tuning.MCP_MAX_RESULTS), window,
                                       key.prefixes or None))
        return [{k: h.get(k) for k in ("memory_id", "entity_id", "created_at_ms", "similarity", "textual_content")}
                for h in hits]

    @server.tool(description="Delete one memory by its id.")
    async def forget(memory_id: str, ctx: Context) -> dict[str, Any]:
        key = caller(ctx, "write")
        found = await run(cluster.inspect(memory_id, False, 0))
        if found is None or not key.covers(found["entity_id"]):
            return {"memory_id": memory_id, "deleted": False}
        deleted = await run(cluster.delete(memory_id))
        http[AUDIT].record(key.name, "delete", 200, memory_id=memory_id, deleted=deleted, via="mcp")
        return {"memory_id": memory_id, "deleted": deleted}

    @server.tool(description="What is true about an entity now (its current facts) and its most recent memories.")
    async def profile(entity_id: str, ctx: Context, recent: int = 5) -> dict[str, Any]:
        caller(ctx, "read", entity_id)
        found = await run(cluster.profile(entity_id, max(0, min(recent, tuning.MCP_MAX_RESULTS))))
        return {"entity_id": entity_id, **(found or {"memories": 0})}

    @server.tool(description="Exact count, sum, average, min, max and stddev of a measurement label of an entity "
                             "(money_usd, distance_km, duration_min, weight_kg, percent, count_<noun>, or your own).")
    async def analytics(entity_id: str, label: str, ctx: Context, start_ms: int | None = None,
                        end_ms: int | None = None, bucket: str | None = None) -> dict[str, Any]:
        caller(ctx, "read", entity_id)
        req = valid(AnalyticsRequest, {"entity_id": entity_id, "label": label, "start_timestamp_ms": start_ms,
                                       "end_timestamp_ms": end_ms, "bucket": bucket})
        result = await run(cluster.analytics(req.entity_id, req.label, req.start_timestamp_ms, req.end_timestamp_ms,
                                             req.bucket))
        return {"entity_id": entity_id, "label": label, **finite(result)}

    # The routes' keys and rate limits guard /mcp already; Host checks would refuse a router behind
    # a load balancer, and the MCP SDK only needs them for servers without authentication.
    return server.streamable_http_app(streamable_http_path="/mcp", stateless_http=True, json_response=True,
                                      transport_security=TransportSecuritySettings(
                                          enable_dns_rebinding_protection=False))

