"""Who may do what: the key of each request, its role for the route, its entity prefixes, its rate.

`access_middleware` identifies the request's key (router.keys), answers 401 for none (a client
that keeps sending wrong keys waits longer each time), 403 when the key's role is below the
route's (from the route table, router.routes; HEAD as GET), and 429 with `Retry-After` when the key's token bucket is empty. Handlers then check the
entities they touch with `require_entity`; a key with prefixes sees only entities that start with
one of them. Counters go to /metrics by key *name*.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from typing import Awaitable, Callable

from aiohttp import web

from router import tuning
from router.errors import Forbidden, RateLimited, Unauthorized
from router.keys import Key, KeyRing

KEYRING = web.AppKey("keyring", KeyRing)
KEY = web.RequestKey("key", Key)  # request[KEY]: the Key that made the request

ADMIN_PREFIX = "/admin/"  # a request no route matches (a 404 or 405 to come) needs admin under it, else read

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def required_role(request: web.Request, roles: dict[tuple[str, str], str]) -> str:
    """The role of the route the request matched (`roles`: router.routes.roles()). A request no
    route matches: `open` on an open route's path (its 405 needs no key), else by ADMIN_PREFIX."""
    resource = request.match_info.route.resource
    method = "GET" if request.method == "HEAD" else request.method
    role = roles.get((method, resource.canonical)) if resource is not None else None
    if role is None and any(r == "open" and p == request.path for (_, p), r in roles.items()):
        role = "open"
    return role or ("admin" if request.path.startswith(ADMIN_PREFIX) else "read")


class RateLimiter:
    """A token bucket per key name (requests per second, burst), and wrong-key counts per client."""

    def __init__(self, default_rate: float, default_burst: int) -> None:
        self.default_rate, self.default_burst = default_rate, default_burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key name -> (tokens, last refill)
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def take(self, key: Key) -> float:
        """0 when the request may go; else the seconds until a token is due."""
        rate = key.rate if key.rate is not None else self.default_rate
        if rate <= 0:
            return 0.0
        burst = key.burst if key.burst is not None else (self.default_burst or max(1, math.ceil(rate)))
        now = time.monotonic()
        tokens, last = self._buckets.get(key.name, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key.name] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key.name] = (tokens, now)
        return (1.0 - tokens) / rate

    def failed(self, client: str) -> float:
        """Record a wrong key from `client`; the delay its answer gets (doubling past tuning.FREE_FAILURES)."""
        now = time.monotonic()
        seen = self._failures[client]
        seen.append(now)
        while seen and now - seen[0] > tuning.FAILURE_WINDOW_S:
            seen.popleft()
        if len(self._failures) > tuning.FAILURE_CLIENTS:  # forget the quiet ones; the map must not grow without bound
            for c in [c for c, q in self._failures.items() if not q or now - q[-1] > tuning.FAILURE_WINDOW_S]:
                del self._failures[c]
        extra = len(seen) - tuning.FREE_FAILURES
        return 0.0 if extra <= 0 else min(tuning.MAX_DELAY_S, tuning.FIRST_DELAY_S * 2 ** (extra - 1))


LIMITER = web.AppKey("limiter", RateLimiter)


def make_middleware(roles: dict[tuple[str, str], str], open_prefix: str, metrics_of) -> Callable:
    """The middleware for routes of `roles` (role `open`: no key); paths under `open_prefix` are open too."""
    @web.middleware
    async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        role = required_role(request, roles)
        if role == "open" or request.path.startswith(open_prefix):
            return await handler(request)
        ring, limiter, metrics = request.app[KEYRING], request.app[LIMITER], metrics_of(request.app)
        ring.maybe_reload()
        offered = [request.headers.get("x-api-key", "")]
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        key = ring.identify([o for o in offered if o])
        if key is None:
            metrics.auth_failures.inc()
            delay = limiter.failed(request.remote or "unknown")
            if delay:
                await asyncio.sleep(delay)
            raise Unauthorized("missing or wrong API key (send x-api-key or Authorization: Bearer)")
        if not key.may(role):
            metrics.key_requests.labels(key.name, "forbidden").inc()
            raise Forbidden(f"key {key.name!r} has role {key.role!r}; {request.method} {request.path} needs {role!r}")
        wait = limiter.take(key)
        if wait:
            metrics.key_requests.labels(key.name, "rate_limited").inc()
            raise RateLimited(f"key {key.name!r} is over its rate limit; retry in {wait:.2f} s", wait)
        request[KEY] = key
        try:
            response = await handler(request)
        except Forbidden:  # an entity outside the key's prefixes (require_entity)
            metrics.key_requests.labels(key.name, "forbidden").inc()
            raise
        metrics.key_requests.labels(key.name, "ok").inc()
        return response

    return access_middleware


def current_key(request: web.Request) -> Key:
    return request[KEY]


def require_entity(request: web.Request, entity_id: str, field: str = "entity_id") -> None:
    """403 unless the request's key may touch `entity_id`."""
    key = current_key(request)
    if not key.covers(entity_id):
        raise Forbidden(f"{field}: key {key.name!r} may only touch entities starting with "
                        f"{', '.join(repr(p) for p in key.prefixes)}")


def prefixes(request: web.Request) -> tuple[str, ...] | None:
    """The entity prefixes a request may search, or None for every entity."""
    return current_key(request).prefixes or None
