"""What every handler shares: the application's keys, reading a request's JSON, the audit trail.

The route modules (router.handlers, router.admin, router.mcp_tools) import this, never router.app,
so the app can import them without a circle.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.web_protocol import RequestPayloadError

from node.config import ClusterConfig
from router import access
from router.audit import Audit
from router.cluster import Cluster
from router.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed
from router.metrics import Metrics

CONFIG = web.AppKey("config", ClusterConfig)
CLUSTER = web.AppKey("cluster", Cluster)
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", Audit)
OPENAPI = web.AppKey("openapi", dict)

# Content-Encodings aiohttp decodes for us; any other would reach the JSON parser still encoded.
ENCODINGS = frozenset({"", "identity", "gzip", "deflate"} | ({"br"} if HAS_BROTLI else set())
                      | ({"zstd"} if HAS_ZSTD else set()))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> Any:
    """The body as JSON, whatever its Content-Type (SDKs and curl users vary); gzip/deflate bodies are
    decoded, other Content-Encodings are refused (415), and every malformed body is a 400."""
    limit = request.app[CONFIG].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send one of "
                                   f"{', '.join(sorted(ENCODINGS - {''}))}")
    try:
        raw = await request.read()
    except RequestPayloadError:
        raise BadRequest(f"request body could not be decoded as Content-Encoding {encoding!r}") from None
    if not raw:
        raise BadRequest("request body is empty; send a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # rejects lone surrogates such as "\ud800"
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise BadRequest("request body is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, NaN, integers past Python's 4300 digits
        raise BadRequest(f"malformed JSON: {exc}") from None
    return data


def query_params(request: web.Request) -> dict[str, str]:
    """The query string as a dict; a repeated parameter is ambiguous, so it is refused."""
    params = dict(request.query)
    if len(params) != len(request.query):
        raise ValidationFailed("query string: a parameter is repeated")
    return params


def audit(request: web.Request, action: str, outcome: int, **subject: Any) -> None:
    request.app[AUDIT].record(access.current_key(request).name, action, outcome, **subject)
    request.app[METRICS].audit_events.labels(action).inc()
