"""Stage timings of an answer, in the headers the upstream engine sends (tellodb/tellodb,
src/api/handlers/query.rs and ingest.rs: `x-tm-<stage>-ms` and `x-tm-<stage>-us`, whole numbers,
the milliseconds truncated) and in the standard `Server-Timing` header (`<stage>;dur=<milliseconds>`).

A route whose row in router.routes names `stages` runs inside `timed`: the request carries a
`Timing` (`TIMING`), what is measured goes in with `record` (one stage), `measure` (a block) or
`add` (a dict of stage -> seconds, as a node reports its query's stages: one call), and the answer
leaves with a header pair for each stage, 0 for a stage nothing measured, so clients see the same
set every time; `x-tm-total` is the handler's own wall time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Awaitable, Callable, Iterator, Mapping

from aiohttp import web

# The upstream's query stages (and `storage`, which nodes report), then `cluster`: the router's wait
# for the nodes (Ray round trips and the nodes' own work), the one stage the router measures itself.
QUERY_STAGES = ("embed", "ann", "fts", "fuse", "hydrate", "storage", "rerank", "cluster")
INGEST_STAGES = ("embed", "storage", "fts", "vector", "graph", "fact", "cluster")
# No cross-encoder is shipped or downloaded (the engine runs offline with its one embedding model),
# so `enable_neural_rerank` is accepted and never applied: docs/guide/api.md.
RERANK_APPLIED = "0"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Timing:
    """Seconds per stage of one request, from `started` (time.perf_counter)."""

    def __init__(self, stages: tuple[str, ...]) -> None:
        self.started = time.perf_counter()
        self.rerank = "rerank" in stages
        self.seconds = dict.fromkeys(stages, 0.0)

    def add(self, stages: Mapping[str, float]) -> None:
        """Add each stage's seconds to what is recorded (a stage measured twice, in two calls one
        after the other, is the sum; for parts that ran side by side, add the slowest)."""
        for stage, seconds in stages.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + max(0.0, float(seconds))

    def headers(self, total_s: float) -> dict[str, str]:
        out: dict[str, str] = {}
        for stage, seconds in (*self.seconds.items(), ("total", total_s)):
            us = round(seconds * 1_000_000)
            out[f"x-tm-{stage}-ms"] = str(us // 1000)
            out[f"x-tm-{stage}-us"] = str(us)
        if self.rerank:
            out["x-tm-rerank-applied"] = RERANK_APPLIED
        out["Server-Timing"] = ", ".join(f"{stage};dur={seconds * 1000:.3f}"
                                         for stage, seconds in (*self.seconds.items(), ("total", total_s)))
        return out


TIMING = web.RequestKey("timing", Timing)


def add(request: web.Request, stages: Mapping[str, float]) -> None:
    """Record seconds per stage on the request (nothing if its route sends no timings)."""
    timing = request.get(TIMING)
    if timing is not None:
        timing.add(stages)


def record(request: web.Request, stage: str, seconds: float) -> None:
    add(request, {stage: seconds})


@contextlib.contextmanager
def measure(request: web.Request, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        record(request, stage, time.perf_counter() - started)


def timed(handler: Handler, stages: tuple[str, ...]) -> Handler:
    """`handler`, answering with the timing headers of `stages` and its total."""
    async def timed_handler(request: web.Request) -> web.StreamResponse:
        timing = request[TIMING] = Timing(stages)
        response = await handler(request)
        if not response.prepared:  # a streamed answer has sent its headers already
            response.headers.update(timing.headers(time.perf_counter() - timing.started))
        return response

    timed_handler.__name__ = handler.__name__
    return timed_handler


def documented(stages: tuple[str, ...]) -> dict[str, dict]:
    """The headers of `stages` as OpenAPI response header objects."""
    number = {"type": "string", "pattern": "^[0-9]+$"}
    out = {}
    for stage in (*stages, "total"):
        what = "the handler's wall time" if stage == "total" else f"the {stage} stage (0 when not measured)"
        out[f"x-tm-{stage}-ms"] = {"description": f"{what}, whole milliseconds", "schema": number}
        out[f"x-tm-{stage}-us"] = {"description": f"{what}, whole microseconds", "schema": number}
    if "rerank" in stages:
        out["x-tm-rerank-applied"] = {"description": "1 if a neural reranker reordered the hits; always 0 here "
                                      "(no cross-encoder model is available)", "schema": {"type": "string",
                                                                                         "enum": ["0", "1"]}}
    out["Server-Timing"] = {"description": "the same stages and `total`, `<stage>;dur=<milliseconds>`",
                           "schema": {"type": "string"}}
    return out
