"""The API's OpenAPI 3.1 document, generated from the pydantic request models (router/schemas.py) and
response models (router/responses.py), and the offline /docs page (Swagger UI from a PyPI package).

One table, ROUTES, lists every operation; `create_app` registers the same paths, and a test checks the
two agree, so the document cannot drift from the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router import __version__
from router import responses as r
from router import schemas as q

REF = "#/components/schemas/{model}"
ERRORS = {
    400: "malformed request: bad JSON, bad Content-Encoding data, empty body",
    401: "missing or wrong API key",
    403: "the key's role or entity prefixes do not allow this request",
    404: "not found",
    409: "the cluster cannot change as asked (the message says why)",
    413: "request body larger than max_body_bytes",
    415: "unsupported Content-Encoding",
    422: "well-formed but invalid: the message names the field",
    429: "the key is over its rate limit; see Retry-After",
    503: "unavailable for now (a node or the head did not answer in time, or the router is joining the cluster "
         "again); see Retry-After",
    507: "insufficient storage: a node's disk is full",
}
KEYED = (401, 403, 429)  # every route that needs a key
BODY_ERRORS = (400, *KEYED, 413, 415, 422, 503, 507)
QUERY_ERRORS = (400, *KEYED, 422, 503)


@dataclass(frozen=True)
class Route:
    method: str
    paths: tuple[str, ...]
    summary: str
    response: type[BaseModel] | None  # None: not JSON (described by `media`)
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    also: tuple[type[BaseModel], ...] = ()  # other 200 shapes (oneOf)
    media: tuple[str, str] | None = None  # (content type, description) of a non-JSON 200
    open: bool = False  # no API key needed
    params: tuple[dict, ...] = ()  # path parameters, as OpenAPI parameter objects
    ok: int = 200  # the success status


ROUTES = (
    Route("get", ("/health", "/v1/health"), "Liveness", r.Health, open=True),
    Route("get", ("/ready",), "Readiness: 200 when this router can route now, else 503 with this body and the reason",
          r.Ready, open=True),
    Route("get", ("/version", "/v1/version"), "Engine and API version", r.Version, errors=KEYED),
    Route("post", ("/ingest",), "Store one memory", r.IngestResult, q.IngestRequest, errors=BODY_ERRORS),
    Route("post", ("/ingest/batch",), "Store many memories", r.BatchResult, q.IngestBatchRequest, errors=BODY_ERRORS),
    Route("post", ("/query/semantic", "/query"), "Best memories for a text (hybrid ranking)", None, q.QueryRequest,
          errors=BODY_ERRORS),
    Route("get", ("/temporal/query",), "Best memories within a time window; without text, newest first", None,
          query=q.TemporalQuery, errors=QUERY_ERRORS),
    Route("post", ("/graph/query",), "Edges of one node", r.GraphQueryResult, q.GraphQueryRequest, errors=BODY_ERRORS),
    Route("post", ("/graph/walk",), "Breadth-first walk", r.GraphWalkResult, q.GraphWalkRequest, errors=BODY_ERRORS),
    Route("post", ("/graph/export",), "Neighbourhood of a seed for a visualiser", r.GraphExportResult,
          q.GraphExportRequest, errors=BODY_ERRORS),
    Route("post", ("/analytics/query",), "Aggregates of one measurement label", r.AnalyticsResult, q.AnalyticsRequest,
          errors=BODY_ERRORS),
    Route("post", ("/entity/export",), "Everything held about an entity", None, q.EntityRequest, errors=BODY_ERRORS,
          media=("application/x-ndjson", r.EXPORT_DESCRIPTION)),
    Route("post", ("/entity/erase",), "Erase an entity everywhere", r.EraseResult, q.EntityRequest, errors=BODY_ERRORS),
    Route("post", ("/memory/inspect",), "One memory, optionally with its session's turns", r.InspectResult,
          q.InspectRequest, errors=(*BODY_ERRORS, 404)),
    Route("post", ("/memory/delete",), "Delete one memory", r.DeleteResult, q.DeleteRequest, errors=BODY_ERRORS),
    Route("get", ("/stats",), "Engine counts, per node and shard", r.Stats, errors=(*KEYED, 503)),
    Route("get", ("/profile",), "An entity's current facts and recent memories; without entity_id, the totals",
          r.EntityProfile, query=q.ProfileQuery, errors=(*QUERY_ERRORS, 404), also=(r.EngineProfile,)),
    Route("get", ("/metrics",), "Prometheus metrics", None, open=True,
          media=("text/plain", "Prometheus text exposition format")),
    Route("get", ("/openapi.json",), "This document", None, open=True,
          media=("application/json", "OpenAPI 3.1 document")),
    Route("get", ("/docs",), "API documentation page (Swagger UI, served offline)", None, open=True,
          media=("text/html", "HTML page")),
    Route("get", ("/admin/cluster",), "Nodes, their shards and sizes, moves in progress, the placement epoch",
          r.ClusterStatus, errors=(*KEYED, 503)),
    Route("post", ("/admin/nodes",), "Make a joined node a member: its share of shards moves to it (follow with "
          "GET /admin/cluster)", r.ClusterChange, q.NodeRequest, errors=(*BODY_ERRORS, 404, 409, 503), ok=202),
    Route("delete", ("/admin/nodes/{name}",), "Move every shard of a node to the others", r.ClusterChange,
          errors=(*KEYED, 404, 409, 503), ok=202,
          params=({"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},)),
    Route("get", ("/admin/shards",), "The cluster's shards, model and placement (for backups)", r.ShardsInfo,
          errors=KEYED),
    Route("post", ("/admin/shards/{shard}/snapshot",), "A consistent copy of one shard's SQLite file, taken while "
          "it serves; headers X-Tellodb-Seq and X-Tellodb-Sha256 describe it", None, errors=(*KEYED, 404, 503, 507),
          media=("application/octet-stream", "the shard's SQLite file at sequence X-Tellodb-Seq"),
          params=({"name": "shard", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},)),
)
HIT_ARRAY_ROUTES = {"/query/semantic", "/query", "/temporal/query"}  # 200 is a JSON array of hits


def _ref(schema: dict) -> dict:
    return {"$ref": schema["$ref"]}


def _query_parameters(model: type[BaseModel], schema: dict) -> list[dict]:
    """Each field of a query model as a query parameter; `null` alternatives dropped (absent means None)."""
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if len(variants) == 1:
            prop.update(variants[0])
        elif variants:
            prop["anyOf"] = variants
        prop.pop("title", None)
        if prop.get("default", 0) is None:
            del prop["default"]
        params.append({"name": name, "in": "query", "required": name in schema.get("required", ()), "schema": prop})
    return params


def _config_limits(defs: dict, paths: dict, max_query_limit: int, max_batch_items: int) -> None:
    """Limits the handlers take from the configuration, not from the models."""
    defs["QueryRequest"]["properties"]["limit"]["maximum"] = max_query_limit
    for param in paths["/temporal/query"]["get"]["parameters"]:
        if param["name"] == "limit":
            param["schema"]["maximum"] = max_query_limit
    defs["IngestBatchRequest"]["properties"]["items"]["maxItems"] = max_batch_items


def build(max_query_limit: int, max_batch_items: int) -> dict[str, Any]:
    """The whole document (a fresh dict each call), with the configured limits."""
    models = [(m, "validation") for m in {x.body for x in ROUTES if x.body}]
    models += [(m, "serialization") for x in ROUTES for m in (x.response, *x.also) if m]
    models += [(r.Hit, "serialization"), (r.ErrorBody, "serialization")]
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)
    error = {"description": "", "content": {"application/json": {"schema": _ref(refs[(r.ErrorBody, "serialization")])}}}
    paths: dict[str, dict] = {}
    for route in ROUTES:
        op: dict[str, Any] = {"summary": route.summary, "responses": {}}
        if route.open:
            op["security"] = []
        if route.body:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": _ref(refs[(route.body, "validation")])}}}
        if route.query:
            op["parameters"] = _query_parameters(route.query, route.query.model_json_schema(mode="validation"))
        if route.params:
            op["parameters"] = list(route.params)
        if route.media:
            media, description = route.media
            ok = {"description": description, "content": {media: {"schema": {"type": "string"}}}}
            if media == "application/json":
                ok["content"][media]["schema"] = {"type": "object"}
        else:
            shapes = [_ref(refs[(m, "serialization")]) for m in (route.response, *route.also) if m]
            if route.paths[0] in HIT_ARRAY_ROUTES:
                shapes = [{"type": "array", "items": _ref(refs[(r.Hit, "serialization")])}]
            schema = shapes[0] if len(shapes) == 1 else {"oneOf": shapes}
            ok = {"description": "OK", "content": {"application/json": {"schema": schema}}}
        op["responses"][str(route.ok)] = ok
        for status in sorted(route.errors):
            op["responses"][str(status)] = {**error, "description": ERRORS[status]}
        if route.query:  # a request line past 8190 bytes is refused by aiohttp's parser, in plain text
            op["responses"]["400"] = {"description": f"{ERRORS[400]}; a request line longer than 8190 bytes gets a "
                                      "plain-text 400 from the HTTP parser",
                                      "content": {**error["content"], "text/plain": {"schema": {"type": "string"}}}}
        for i, path in enumerate(route.paths):
            paths.setdefault(path, {})[route.method] = {
                **op, "operationId": f"{route.method}_{path.strip('/').replace('/', '_').replace('.', '_')}",
                **({"description": f"Alias of {route.paths[0]}."} if i else {})}
    _config_limits(defs["$defs"], paths, max_query_limit, max_batch_items)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tellodb-cluster", "version": __version__,
                 "description": "Tellodb-compatible memory engine. Every error body is "
                                "`{\"error\": {\"code\", \"message\"}}`."},
        "security": [{"ApiKey": []}, {"Bearer": []}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                                "Bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


DOCS_HTML = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>tellodb-cluster API</title>
<link rel="stylesheet" href="docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", validatorUrl: null});</script>
</body></html>
"""
