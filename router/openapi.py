"""The API's OpenAPI 3.1 document, generated from the route table (router.routes), the pydantic
request models (router/schemas.py) and response models (router/responses.py). (The /docs page that
shows it is router.handlers.docs.)

The table also registers the routes, so the document cannot drift from the router.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router import __version__, timing
from router import responses as r
from router.routes import ROUTES

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
STATUS_TEXT = {200: "OK", 201: "Created", 202: "Accepted"}  # the success statuses of the route table


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
            if route.hits:
                shapes = [{"type": "array", "items": _ref(refs[(r.Hit, "serialization")])}]
            schema = shapes[0] if len(shapes) == 1 else {"oneOf": shapes}
            ok = {"description": STATUS_TEXT[route.ok], "content": {"application/json": {"schema": schema}}}
        if route.stages is not None:
            ok["headers"] = timing.documented(route.stages)
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
