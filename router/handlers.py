"""The routes' handlers (but router.admin's): memories in (ingest), out (query, inspect, export),
graph walks, analytics, erasure, the engine's counts, health, metrics and the API's documentation. Each parses its request with router.schemas, checks
the key's entities (router.access), and asks the cluster (router.cluster.Cluster); the route table
(router.routes) says which path and role each has.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from aiohttp import web

from node.ids import new_memory_id, parse_memory_id
from node.records import IngestItem
from node.node_stats import STAT_KEYS
from router import __version__, access, timing, tuning
from router.access import prefixes, require_entity
from router.errors import ApiError, Forbidden, NotFound, ValidationFailed
from router.http import CLUSTER, CONFIG, METRICS, OPENAPI, audit, query_params, read_json
from router.limits import check_ingest
from router.schemas import (AnalyticsRequest, DeleteRequest, EntityRequest, GraphExportRequest, GraphQueryRequest,
                            GraphWalkRequest, IngestBatchRequest, IngestRequest, InspectRequest, ProfileQuery,
                            QueryRequest, TemporalQuery, parse)

log = logging.getLogger("tellodb.router")

HIT_FIELDS = ("memory_id", "entity_id", "session_id", "turn_index", "created_at_ms", "similarity",
              "textual_content", "kind")


def to_item(req: IngestRequest, field: str = "memory_id") -> IngestItem:
    memory_id = req.memory_id or new_memory_id(req.entity_id)
    parsed = parse_memory_id(memory_id)
    if parsed.entity_prefix is not None and parsed.entity_prefix != req.entity_id:
        raise ValidationFailed(
            f"{field}: {memory_id!r} names entity {parsed.entity_prefix!r} but entity_id is {req.entity_id!r} "
            "(ids of the form <entity>::<session>::<turn> belong to their entity)")
    return IngestItem(
        memory_id=memory_id,
        entity_id=req.entity_id,
        session_id=parsed.session_id,
        turn_index=parsed.turn_index,
        created_at_ms=req.timestamp if req.timestamp is not None else int(time.time() * 1000),
        kind=req.kind,
        textual_content=req.textual_content,
        relations=tuple(req.triples()),
        metrics=tuple((req.metrics or {}).items()),
        fact_key=req.fact_key,
        enable_semantic_dedup=bool(req.enable_semantic_dedup),
        generated_id=req.memory_id is None,  # new for sure: a failed batch takes it back (Cluster.ingest)
    )


def hit_view(hit: dict[str, Any]) -> dict[str, Any]:
    return {k: hit.get(k) for k in HIT_FIELDS}


async def health(request: web.Request) -> web.Response:
    """Liveness: this process serves HTTP (whether it can route is /ready)."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: whether this router can route requests now (503 only while it joins the cluster
    again); `authority_up` says whether the head answers (router.cluster.Cluster.ready)."""
    cluster = request.app[CLUSTER]
    ok, reason = cluster.ready()
    body = {"ready": ok, "authority_up": cluster.authority_up}
    if not ok:
        body["reason"] = reason
    elif not cluster.authority_up:
        body["reason"] = ("the placement authority does not answer (is the head running?): requests use the last "
                          "placement; moves, failovers and member changes wait")
    return web.json_response(body, status=200 if ok else 503)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"engine_version": __version__, "api_version": "v1", "auth_required": True})


async def ingest(request: web.Request) -> web.Response:
    req = parse(IngestRequest, await read_json(request))
    require_entity(request, req.entity_id)
    check_ingest(request.app[CONFIG], [req])
    item = to_item(req)
    with timing.measure(request, "cluster"):
        [duplicate_of] = await request.app[CLUSTER].ingest([item])
    if duplicate_of is None:
        request.app[METRICS].ingest_total.inc()
    return web.json_response({"status": "ok", "memory_id": item.memory_id, "entity_id": item.entity_id,
                              "deduplicated": duplicate_of is not None, "duplicate_of": duplicate_of}, status=201)


async def ingest_batch(request: web.Request) -> web.Response:
    body = parse(IngestBatchRequest, await read_json(request))
    limit = request.app[CONFIG].max_batch_items
    if len(body.items) > limit:
        raise ValidationFailed(f"items: {len(body.items)} items exceed the batch limit of {limit}")
    check_ingest(request.app[CONFIG], body.items, "items.")
    for i, r in enumerate(body.items):
        require_entity(request, r.entity_id, f"items.{i}.entity_id")
    items = [to_item(r, f"items.{i}.memory_id") for i, r in enumerate(body.items)]
    with timing.measure(request, "cluster"):
        duplicate_of = await request.app[CLUSTER].ingest(items) if items else []
    duplicates = {it.memory_id: dup for it, dup in zip(items, duplicate_of) if dup is not None}
    stored = len(items) - len(duplicates)
    if stored:
        request.app[METRICS].ingest_total.inc(stored)
    return web.json_response({"status": "ok", "ingested": stored, "memory_ids": [i.memory_id for i in items],
                              "duplicates": duplicates}, status=201)


async def query(request: web.Request) -> web.Response:
    started = time.perf_counter()
    req = parse(QueryRequest, await read_json(request))
    limit = request.app[CONFIG].max_query_limit
    if req.limit > limit:
        raise ValidationFailed(f"limit: must be at most {limit}")
    window = None if req.point_in_time_ms is None else (None, req.point_in_time_ms)
    hits = await scoped_query(request, req.textual_query, req.entity_id, req.limit, window)
    metrics = request.app[METRICS]
    metrics.query_total.inc()
    metrics.query_duration.observe(time.perf_counter() - started)
    return web.json_response([hit_view(h) for h in hits])


async def temporal_query(request: web.Request) -> web.Response:
    """The best matches created within [window_start_ms, window_end_ms]; without text, in time order."""
    req = parse(TemporalQuery, query_params(request))
    if req.limit > request.app[CONFIG].max_query_limit:
        raise ValidationFailed(f"limit: must be at most {request.app[CONFIG].max_query_limit}")
    if None not in (req.window_start_ms, req.window_end_ms) and req.window_start_ms > req.window_end_ms:
        raise ValidationFailed("window_start_ms: must not be after window_end_ms")
    hits = await scoped_query(request, req.textual_query, req.entity_id, req.limit,
                              (req.window_start_ms, req.window_end_ms))
    return web.json_response([hit_view(h) for h in hits])


async def scoped_query(request: web.Request, text: str | None, entity_id: str | None, limit: int,
                       window: tuple[int | None, int | None] | None) -> list[dict[str, Any]]:
    """A query within what the key may see: its entity, or without one every entity of its prefixes."""
    if entity_id is not None:
        require_entity(request, entity_id)
    with timing.measure(request, "cluster"):
        hits = await request.app[CLUSTER].query(text, entity_id, limit, window, prefixes(request))
    timing.add(request, getattr(hits, "stages", {}))  # the nodes' stages (node.records.Hits)
    return hits


def require_user(request: web.Request, user_id: str | None) -> None:
    """Graph routes: a key with prefixes must name the entity (`user_id`) whose edges it reads."""
    if user_id is not None:
        require_entity(request, user_id, "user_id")
    elif prefixes(request):
        raise Forbidden("user_id: a key limited to entity prefixes must name the entity (user_id) whose graph "
                        "it reads")


async def graph_query(request: web.Request) -> web.Response:
    """Edges of one node: out (it is the source), in (the target) or both; newest first."""
    req = parse(GraphQueryRequest, await read_json(request))
    require_user(request, req.user_id)
    edges = await request.app[CLUSTER].edges([req.subject], req.direction,
                                             [req.edge_type] if req.edge_type else None, req.limit, req.user_id)
    edges = edges[: req.limit]
    return web.json_response({"subject": req.subject, "direction": req.direction, "count": len(edges),
                              "edges": edges})


async def graph_walk(request: web.Request) -> web.Response:
    """A breadth-first walk that honours direction, edge types, depth, breadth and limit."""
    req = parse(GraphWalkRequest, await read_json(request))
    require_user(request, req.user_id)
    result = await request.app[CLUSTER].walk(req.node, req.direction, req.edge_types, req.depth, req.breadth,
                                             req.limit, tuning.WALK_EDGES_PER_RESULT * req.limit + 1, req.user_id)
    return web.json_response(result)


async def graph_export(request: web.Request) -> web.Response:
    """The neighbourhood of `seed` as `{nodes, edges}` for a graph visualiser."""
    req = parse(GraphExportRequest, await read_json(request))
    require_user(request, req.user_id)
    walk = await request.app[CLUSTER].walk(req.seed, req.direction, req.edge_types, req.depth, req.breadth,
                                           tuning.WALK_EDGES_PER_RESULT * req.max_nodes, req.max_nodes, req.user_id)
    nodes = [{"id": n["id"], "label": n["id"], "depth": n["depth"]} for n in walk["nodes"]]
    edges = [{"id": f"{e['source']}|{e['edge_type']}|{e['target']}|{e['memory_id']}", "source": e["source"],
              "target": e["target"], "label": e["edge_type"], "edge_type": e["edge_type"],
              "memory_id": e["memory_id"], "timestamp_ms": e["timestamp_ms"], "valid": e["valid"]}
             for e in walk["edges"]]
    return web.json_response({"seed": req.seed, "nodes": nodes, "edges": edges})


async def analytics_query(request: web.Request) -> web.Response:
    """Exact aggregates of one measurement label of one entity, optionally per time bucket."""
    req = parse(AnalyticsRequest, await read_json(request))
    require_entity(request, req.entity_id)
    if None not in (req.start_timestamp_ms, req.end_timestamp_ms) and req.start_timestamp_ms > req.end_timestamp_ms:
        raise ValidationFailed("start_timestamp_ms: must not be after end_timestamp_ms")
    result = finite(await request.app[CLUSTER].analytics(req.entity_id, req.label, req.start_timestamp_ms,
                                                         req.end_timestamp_ms, req.bucket))
    if "buckets" in result:
        result["buckets"] = [finite(b) for b in result["buckets"]]
    return web.json_response({"entity_id": req.entity_id, "label": req.label, **result})


def finite(summary: dict[str, Any]) -> dict[str, Any]:
    """An aggregate that overflowed a double is null: `Infinity` is not JSON."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}


async def export_entity(request: web.Request) -> web.StreamResponse:
    """Everything held about an entity as JSON lines: a header, its memories, their relations, a summary."""
    req = parse(EntityRequest, await read_json(request))
    require_entity(request, req.entity_id)
    audit(request, "export", 200, entity_id=req.entity_id)
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)

    async def line(obj: dict) -> None:
        await response.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))

    await line({"type": "entity", "entity_id": req.entity_id, "exported_at_ms": int(time.time() * 1000)})
    memories = relations = measurements = 0
    async for page in request.app[CLUSTER].export_entity(req.entity_id):
        for memory in page:
            memory.pop("rowid", None)
            await line({"type": "memory", **memory})
            memories += 1
            for m in memory.pop("measurements", []):
                await line({"type": "measurement", "entity_id": req.entity_id, "memory_id": memory["memory_id"], **m})
                measurements += 1
            for subject, predicate, obj in memory["relations"]:
                await line({"type": "relation", "source": subject, "edge_type": predicate, "target": obj,
                            "memory_id": memory["memory_id"], "timestamp_ms": memory["created_at_ms"]})
                relations += 1
    await line({"type": "summary", "memories": memories, "relations": relations, "measurements": measurements})
    await response.write_eof()
    return response


async def erase_entity(request: web.Request) -> web.Response:
    req = parse(EntityRequest, await read_json(request))
    require_entity(request, req.entity_id)
    try:
        removed = await request.app[CLUSTER].erase_entity(req.entity_id)
    except ApiError as exc:
        audit(request, "erase", exc.status, entity_id=req.entity_id)
        raise
    audit(request, "erase", 200, entity_id=req.entity_id)
    log.info("entity erased entity_id=%s shards=%s", req.entity_id, sorted(removed))
    return web.json_response({
        "entity_id": req.entity_id,
        "erased": True,
        "memories": sum(c["memories"] for c in removed.values()),
        "relations": sum(c["relations"] for c in removed.values()),
        "measurements": sum(c["measurements"] for c in removed.values()),
        "shards": removed,
    })


def require_memory_scope(request: web.Request, memory_id: str) -> bool:
    """For an `<entity>::...` id: 403 outside the key's prefixes. Returns whether the id is free-form,
    whose entity is only known once found (and a memory outside the scope then reads as absent)."""
    entity = parse_memory_id(memory_id).entity_prefix
    if entity is not None:
        require_entity(request, entity, "memory_id")
    return entity is None


def visible(request: web.Request, memory: dict | None) -> dict | None:
    return memory if memory is not None and access.current_key(request).covers(memory["entity_id"]) else None


async def inspect(request: web.Request) -> web.Response:
    req = parse(InspectRequest, await read_json(request))
    require_memory_scope(request, req.memory_id)
    found = visible(request, await request.app[CLUSTER].inspect(req.memory_id, req.include_turn_window,
                                                                req.turn_window_radius))
    if found is None:
        raise NotFound(f"no memory with id {req.memory_id!r}")
    return web.json_response(found)


async def delete(request: web.Request) -> web.Response:
    req = parse(DeleteRequest, await read_json(request))
    cluster = request.app[CLUSTER]
    if require_memory_scope(request, req.memory_id) and prefixes(request) and \
            visible(request, await cluster.inspect(req.memory_id, False, 0)) is None:
        deleted = False  # not there, or another tenant's: the same answer, so nothing leaks
    else:
        deleted = await cluster.delete(req.memory_id)
    audit(request, "delete", 200, memory_id=req.memory_id, deleted=deleted)
    if deleted:
        log.info("memory deleted memory_id=%s reason=%s", req.memory_id, req.reason or "-")
    return web.json_response({"deleted": deleted, "memory_id": req.memory_id})


def totals(per_node: dict[str, dict | None]) -> dict[str, int]:
    """Cluster-wide counts from the nodes that answered, and how many did."""
    live = [s for s in per_node.values() if s is not None]
    return {**{k: sum(s[k] for s in live) for k in STAT_KEYS}, "nodes_up": len(live)}


async def stats(request: web.Request) -> web.Response:
    per_node = await request.app[CLUSTER].stats(timeout=tuning.STATS_TIMEOUT_S)
    request.app[METRICS].observe_nodes(per_node)
    return web.json_response({
        **totals(per_node),
        "shards": request.app[CONFIG].shards,
        "nodes": per_node,  # each with its totals and `per_shard` counts (open shards only)
        "router": {"merged": request.app[CLUSTER].merged_calls(), "embedding": request.app[CLUSTER].query_embedder.stats()},
    })


async def profile(request: web.Request) -> web.Response:
    """GET /profile?entity_id=: the entity's current facts and recent activity. Without an entity
    (the SDK's get_profile() sends none): the engine's totals."""
    req = parse(ProfileQuery, query_params(request))
    if req.entity_id is None:
        if prefixes(request):
            raise Forbidden("entity_id: the engine's totals are for keys without entity prefixes")
        per_node = await request.app[CLUSTER].stats(timeout=tuning.STATS_TIMEOUT_S)
        return web.json_response({"entity_id": None, **totals(per_node)})
    require_entity(request, req.entity_id)
    found = await request.app[CLUSTER].profile(req.entity_id, req.recent)
    if not found or not found["memories"]:
        raise NotFound(f"no memories for entity {req.entity_id!r}")
    return web.json_response({"entity_id": req.entity_id, **found})


async def metrics(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    request.app[METRICS].observe_nodes(await cluster.stats(timeout=tuning.METRICS_TIMEOUT_S))
    request.app[METRICS].observe_placement(await cluster.placement_summary(timeout=tuning.METRICS_TIMEOUT_S),
                                           cluster.moved_retries)
    request.app[METRICS].observe_membership(cluster.ready()[0], cluster.authority_up, cluster.rejoins)
    request.app[METRICS].observe_router_embedding(cluster.query_embedder.stats())
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_HTML, content_type="text/html")


DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>tellodb-cluster API</title>
<link rel="stylesheet" href="docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", validatorUrl: null});</script>
</body></html>
"""
