"""The route table: every API operation once, with its handler, the role a key needs, its request
and response models and its summary. From it `create_app` registers the aiohttp routes,
router.openapi writes the document and `access` learns each route's role, so the three cannot
disagree. (Swagger UI's files and the MCP endpoint are mounted by router.app: they are no operations.)

Roles: `open` (no key), `read`, `write`, `admin` (router.keys.Key.may).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel

from router import admin, handlers as h
from router import responses as r
from router import schemas as q
from router import timing
from router.timing import INGEST_STAGES, QUERY_STAGES

KEYED = (401, 403, 429)  # every route that needs a key
BODY_ERRORS = (400, *KEYED, 413, 415, 422, 503, 507)
QUERY_ERRORS = (400, *KEYED, 422, 503)


@dataclass(frozen=True)
class Route:
    method: str
    paths: tuple[str, ...]  # the first is the route's own; the others are aliases
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    role: str
    summary: str
    response: type[BaseModel] | None  # None: not JSON (described by `media`)
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    also: tuple[type[BaseModel], ...] = ()  # other 200 shapes (oneOf)
    media: tuple[str, str] | None = None  # (content type, description) of a non-JSON 200
    params: tuple[dict, ...] = ()  # path parameters, as OpenAPI parameter objects
    ok: int = 200  # the success status
    hits: bool = False  # 200 is a JSON array of hits
    stages: tuple[str, ...] | None = None  # timing headers of these stages and the total (router.timing)

    @property
    def open(self) -> bool:
        return self.role == "open"


ROUTES = (
    Route("get", ("/health", "/v1/health", "/healthz"), h.health, "open", "Liveness", r.Health),
    Route("get", ("/ready",), h.ready, "open",
          "Readiness: 200 when this router can route now, else 503 with this body and the reason", r.Ready),
    Route("get", ("/version", "/v1/version"), h.version, "read", "Engine and API version", r.Version, errors=KEYED),
    Route("post", ("/ingest",), h.ingest, "write", "Store one memory", r.IngestResult, q.IngestRequest,
          errors=BODY_ERRORS, ok=201, stages=INGEST_STAGES),
    Route("post", ("/ingest/batch", "/batch-ingest"), h.ingest_batch, "write", "Store many memories", r.BatchResult,
          q.IngestBatchRequest, errors=BODY_ERRORS, ok=201, stages=INGEST_STAGES),
    Route("post", ("/query/semantic", "/query"), h.query, "read", "Best memories for a text (hybrid ranking)", None,
          q.QueryRequest, errors=BODY_ERRORS, hits=True, stages=QUERY_STAGES),
    Route("get", ("/temporal/query",), h.temporal_query, "read",
          "Best memories within a time window; without text, newest first", None, query=q.TemporalQuery,
          errors=QUERY_ERRORS, hits=True, stages=QUERY_STAGES),
    Route("post", ("/graph/query",), h.graph_query, "read", "Edges of one node", r.GraphQueryResult,
          q.GraphQueryRequest, errors=BODY_ERRORS),
    Route("post", ("/graph/walk",), h.graph_walk, "read", "Breadth-first walk", r.GraphWalkResult, q.GraphWalkRequest,
          errors=BODY_ERRORS),
    Route("post", ("/graph/export",), h.graph_export, "read", "Neighbourhood of a seed for a visualiser",
          r.GraphExportResult, q.GraphExportRequest, errors=BODY_ERRORS),
    Route("post", ("/analytics/query",), h.analytics_query, "read", "Aggregates of one measurement label",
          r.AnalyticsResult, q.AnalyticsRequest, errors=BODY_ERRORS),
    Route("post", ("/entity/export",), h.export_entity, "read", "Everything held about an entity", None,
          q.EntityRequest, errors=BODY_ERRORS, media=("application/x-ndjson", r.EXPORT_DESCRIPTION)),
    Route("post", ("/entity/erase",), h.erase_entity, "write", "Erase an entity everywhere", r.EraseResult,
          q.EntityRequest, errors=BODY_ERRORS),
    Route("post", ("/memory/inspect", "/v1/memory/inspect"), h.inspect, "read", "One memory, optionally with its session's turns",
          r.InspectResult, q.InspectRequest, errors=(*BODY_ERRORS, 404)),
    Route("post", ("/memory/delete", "/v1/memory/delete"), h.delete, "write", "Delete one memory", r.DeleteResult, q.DeleteRequest,
          errors=BODY_ERRORS),
    Route("get", ("/stats",), h.stats, "admin", "Engine counts, per node and shard", r.Stats, errors=(*KEYED, 503)),
    Route("get", ("/profile",), h.profile, "read",
          "An entity's current facts and recent memories; without entity_id, the totals", r.EntityProfile,
          query=q.ProfileQuery, errors=(*QUERY_ERRORS, 404), also=(r.EngineProfile,)),
    Route("get", ("/metrics",), h.metrics, "open", "Prometheus metrics", None,
          media=("text/plain", "Prometheus text exposition format")),
    Route("get", ("/openapi.json",), h.openapi_document, "open", "This document", None,
          media=("application/json", "OpenAPI 3.1 document")),
    Route("get", ("/docs",), h.docs, "open", "API documentation page (Swagger UI, served offline)", None,
          media=("text/html", "HTML page")),
    Route("get", ("/admin/cluster",), admin.cluster_status, "admin",
          "Nodes, their shards and sizes, moves in progress, the placement epoch", r.ClusterStatus,
          errors=(*KEYED, 503)),
    Route("post", ("/admin/nodes",), admin.add_node, "admin", "Make a joined node a member: its share of shards moves "
          "to it (follow with GET /admin/cluster)", r.ClusterChange, q.NodeRequest,
          errors=(*BODY_ERRORS, 404, 409, 503), ok=202),
    Route("delete", ("/admin/nodes/{name}",), admin.remove_node, "admin", "Move every shard of a node to the others",
          r.ClusterChange, errors=(*KEYED, 404, 409, 503), ok=202,
          params=({"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},)),
    Route("post", ("/admin/rebalance",), admin.rebalance, "admin", "Start the pending moves and primary handovers "
          "with the members as they are (follow with GET /admin/cluster)", r.ClusterChange,
          errors=(*KEYED, 409, 503), ok=202),
    Route("post", ("/admin/shards/split",), admin.split, "admin", "Split a shard (or the largest) in two while it "
          "serves; a new shard takes half of its entities (follow with GET /admin/cluster)", r.ClusterChange,
          q.SplitRequest, errors=(*BODY_ERRORS, 409, 503), ok=202),
    Route("get", ("/admin/shards",), admin.shards, "admin", "The cluster's shards, model and placement (for backups)",
          r.ShardsInfo, errors=KEYED),
    Route("post", ("/admin/shards/{shard}/snapshot",), admin.snapshot, "admin", "A consistent copy of one shard's "
          "SQLite file, taken while it serves; headers X-Tellodb-Seq and X-Tellodb-Sha256 describe it", None,
          errors=(*KEYED, 404, 503, 507),
          media=("application/octet-stream", "the shard's SQLite file at sequence X-Tellodb-Seq"),
          params=({"name": "shard", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},)),
    Route("post", ("/admin/reset", "/v1/admin/reset", "/reset"), admin.reset, "admin",
          'Erase every memory of every entity on every node; refused (400) without {"confirm": "delete-all-data"}',
          r.ResetResult, q.ResetRequest, errors=BODY_ERRORS, stages=()),
)


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        handler = route.handler if route.stages is None else timing.timed(route.handler, route.stages)
        for path in route.paths:
            if route.method == "get":
                app.router.add_get(path, handler)  # and HEAD
            else:
                app.router.add_route(route.method.upper(), path, handler)


def roles() -> dict[tuple[str, str], str]:
    """(METHOD, path as routed) -> the role it needs, for router.access."""
    return {(route.method.upper(), path): route.role for route in ROUTES for path in route.paths}
