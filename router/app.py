"""The HTTP front: the Tellodb API on aiohttp, with auth, validation, errors and metrics.

`create_app(config, cluster)` is the factory both `tellodb serve` and the tests call. The routes
come from one table (router.routes), their handlers from router.handlers and router.admin. The
router holds no data; everything it answers comes from the node actors through `Cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Awaitable, Callable

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from node.config import ClusterConfig
from router import access, datadir, mcp_tools, openapi, routes
from router.asgi import AsgiMount
from router.audit import Audit
from router.cluster import Cluster
from router.errors import ApiError
from router.http import AUDIT, CLUSTER, CONFIG, METRICS, OPENAPI
from router.keys import KeyRing
from router.metrics import Metrics

__all__ = ["AUDIT", "CLUSTER", "CONFIG", "METRICS", "OPENAPI", "create_app"]

log = logging.getLogger("tellodb.router")

DOCS_ASSETS = "/docs/static/"  # Swagger UI's files, open like /docs
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    labels = (route, request.method, str(response.status))
    metrics = request.app[METRICS]
    metrics.requests.labels(*labels).inc()
    metrics.request_duration.labels(*labels).observe(time.perf_counter() - started)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as `{"error": {"code", "message"}}`; nothing leaks a traceback."""
    try:
        return await handler(request)
    except ApiError as exc:
        if exc.status >= 500:
            log.error("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
        return web.json_response(exc.body(), status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        message = exc.reason if exc.status != 413 else (
            f"request body exceeds the limit of {request.app[CONFIG].max_body_bytes} bytes")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None  # 405 must list the methods
        return web.json_response({"error": {"code": code, "message": message}}, status=exc.status, headers=headers)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": {"code": "internal", "message": "internal error"}}, status=500)


def create_app(config: ClusterConfig, cluster: Cluster, api_key: str | None = None) -> web.Application:
    """The aiohttp application. `api_key` defaults to the configured key."""
    key = api_key or config.api_key
    if not key:
        raise ValueError("create_app needs an API key")
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware,
                     access.make_middleware(routes.roles(), DOCS_ASSETS, lambda a: a[METRICS])],
        client_max_size=config.max_body_bytes,
    )
    app[CONFIG] = config
    app[CLUSTER] = cluster
    app[METRICS] = Metrics()
    app[access.KEYRING] = KeyRing(key, datadir.keys_path(config.keys_file, config.data_dir))
    app[access.LIMITER] = access.RateLimiter(config.rate_limit, config.rate_burst)
    app[AUDIT] = Audit(datadir.audit_path(config.audit_file, config.data_dir))

    async def close_audit(app: web.Application) -> None:
        app[AUDIT].close()

    app.on_cleanup.append(close_audit)
    app[OPENAPI] = openapi.build(config.max_query_limit, config.max_batch_items)
    routes.add_routes(app)
    app.router.add_static(DOCS_ASSETS, swagger_ui_path)
    mcp = AsgiMount(mcp_tools.build(app))
    app.router.add_route("*", "/mcp", mcp.handle)
    app.cleanup_ctx.append(mcp.lifespan)
    app.cleanup_ctx.append(watch_cluster)
    return app


async def watch_cluster(app: web.Application):
    """The cluster's watch loop (router.cluster.Cluster.watch) runs while the app does."""
    task = asyncio.get_running_loop().create_task(app[CLUSTER].watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
