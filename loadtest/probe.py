"""Side probes against a running engine: does any one request hold a node?

Each probe is one async function `probe(client, **options) -> dict` registered in PROBES; the CLI
runs the chosen ones (all by default) and prints their dicts as one JSON object. `bad_inputs` sends
hostile raw requests (every one must get a 4xx) and `one_id_races` has many clients write one
free-form id under different entities at once (exactly one memory may remain):

    python -m loadtest.probe --url http://127.0.0.1:3000 --key KEY [--probe heavy_inputs]

`heavy_inputs` sends the heaviest legal inputs (under the engine's documented limits, see README:
Limits) to one entity while a side client queries another entity that lives on the same node, and
reports the side client's latency under that load against a quiet baseline, plus each heavy
request's status and duration. To add a probe, write `async def my_probe(client, **options)` that
returns a dict (and ignores options meant for other probes) and add it to PROBES; `Client` has the
HTTP, placement and timing helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp

from node.control.placement import Placement

# The engine's default limits (node/config.py); a deployment with other limits passes its own.
DEFAULT_LIMITS = {"max_text_chars": 32_768, "max_relations": 64, "max_batch_items": 1000,
                  "max_batch_text_bytes": 512 * 1024}
WORDS = ("river stone window garden market coffee morning letter silver number paper travel friend "
         "music winter summer doctor street yellow animal engine history family planet").split()


@dataclass
class Client:
    """HTTP to one engine with its key, and the engine's placement (from /stats) to find entities
    that share a node."""

    session: aiohttp.ClientSession
    url: str
    key: str
    timeout_s: float = 300.0

    async def post(self, path: str, body: Any) -> tuple[int, Any, float]:
        """(status, JSON body or None, seconds); status 0 when the request failed or timed out."""
        started = time.perf_counter()
        try:
            async with self.session.post(self.url + path, json=body, headers={"x-api-key": self.key},
                                         timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                try:
                    data = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = None
                return resp.status, data, time.perf_counter() - started
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return 0, {"error": repr(exc)}, time.perf_counter() - started

    async def placement(self) -> Placement:
        async with self.session.get(self.url + "/stats", headers={"x-api-key": self.key}) as resp:
            stats = await resp.json()
        return Placement(int(stats["shards"]), tuple(stats["nodes"]))

    @staticmethod
    def same_node_entities(placement: Placement, prefix: str) -> tuple[str, str, str]:
        """(heavy entity, side entity, node): two entities on one node, in different shards."""
        heavy = f"{prefix}-heavy-{uuid.uuid4().hex[:8]}"
        node = placement.node_of(heavy)
        for i in range(100_000):
            side = f"{prefix}-side-{uuid.uuid4().hex[:8]}"
            if placement.node_of(side) == node and (placement.shard_of(side) != placement.shard_of(heavy)
                                                    or len(placement.shards_of(node)) == 1):
                return heavy, side, node
        raise RuntimeError("no second entity found on the node")


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    if not seconds:
        return {"n": 0, "p50_ms": None, "max_ms": None}
    return {"n": len(seconds), "p50_ms": round(statistics.median(seconds) * 1000, 1),
            "max_ms": round(max(seconds) * 1000, 1)}


def words_text(chars: int, seed: int = 0) -> str:
    out, n, i = [], 0, seed
    while n < chars:
        w = WORDS[(i * 7 + i // len(WORDS)) % len(WORDS)]
        out.append(w)
        n, i = n + len(w) + 1, i + 1
    return " ".join(out)[:chars]


def heavy_shapes(entity: str, limits: dict[str, int]) -> list[tuple[str, str, dict]]:
    """(name, path, body) of the heaviest requests the limits allow, plus two just over them."""
    chars, items = limits["max_text_chars"], limits["max_batch_items"]
    budget = limits["max_batch_text_bytes"]
    per_item = max(1, budget // items)
    full_texts = max(1, budget // chars)
    rels = [["knows", f"person-{i}"] for i in range(limits["max_relations"])]
    one = lambda text, **extra: {"entity_id": entity, "textual_content": text, **extra}  # noqa: E731
    return [
        ("text_of_digits", "/ingest", one("7" * chars)),
        ("text_of_1_km", "/ingest", one(("1 km " * (chars // 5 + 1))[:chars])),
        ("text_of_words", "/ingest", one(words_text(chars))),
        ("batch_of_max_texts", "/ingest/batch", {"items": [
            one(words_text(chars, i), memory_id=f"{entity}::long::{i}") for i in range(full_texts)]}),
        ("batch_of_max_items", "/ingest/batch", {"items": [
            one(words_text(per_item, i), memory_id=f"{entity}::turns::{i}") for i in range(items)]}),
        ("batch_of_max_relations", "/ingest/batch", {"items": [
            one(f"relations {i}", relations=rels) for i in range(items)]}),
        ("text_over_limit", "/ingest", one("7" * (chars + 1))),
        ("batch_over_text_bytes", "/ingest/batch", {"items": [one("8" * chars)] * (full_texts + 1)}),
    ]


async def heavy_inputs(client: Client, limits: dict[str, int] | None = None, baseline_queries: int = 20,
                       side_pause_s: float = 0.05, prefix: str = "probe", **_: Any) -> dict[str, Any]:
    """Heaviest legal inputs to one entity; side latency of another entity's queries on its node."""
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    placement = await client.placement()
    heavy, side, node = client.same_node_entities(placement, prefix)
    status, body, _ = await client.post("/ingest/batch", {"items": [
        {"entity_id": side, "textual_content": f"side memory {i}: {words_text(80, i)}"} for i in range(20)]})
    if status != 201:
        raise RuntimeError(f"seeding the side entity failed: {status} {body}")
    query = {"textual_query": "river garden coffee", "entity_id": side, "limit": 5}

    spans: list[tuple[float, float]] = []  # (start, end) of each side query under load

    async def side_queries(latencies: list[float], errors: list[Any], stop: asyncio.Event | None, count: int) -> None:
        while (stop is None and len(latencies) + len(errors) < count) or (stop is not None and not stop.is_set()):
            status, body, took = await client.post("/query", query)
            if stop is not None:
                spans.append((time.perf_counter() - took, time.perf_counter()))
            if status == 200:
                latencies.append(took)
            else:
                errors.append({"status": status, "body": body, "seconds": round(took, 3)})
            await asyncio.sleep(side_pause_s)

    quiet: list[float] = []
    quiet_errors: list[Any] = []
    await side_queries(quiet, quiet_errors, None, baseline_queries)

    loaded: list[float] = []
    loaded_errors: list[Any] = []
    stop = asyncio.Event()
    side_task = asyncio.create_task(side_queries(loaded, loaded_errors, stop, 0))
    heavy_results = []
    started = time.perf_counter()
    try:
        for name, path, payload in heavy_shapes(heavy, limits):
            status, body, took = await client.post(path, payload)
            end = time.perf_counter()
            during = [b - a for a, b in spans if a < end and b > end - took]  # side queries that overlapped it
            heavy_results.append({"name": name, "status": status, "seconds": round(took, 3),
                                  "side_max_ms": round(max(during) * 1000, 1) if during else None,
                                  "body_bytes": len(json.dumps(payload)),
                                  **({"error": body.get("error")} if isinstance(body, dict) and status >= 300 else {})})
    finally:
        stop.set()
        await side_task
    return {
        "node": node, "heavy_entity": heavy, "side_entity": side, "limits": limits,
        "baseline": {**latency_summary(quiet), "errors": quiet_errors},
        "under_load": {**latency_summary(loaded), "errors": loaded_errors},
        "heavy_seconds": round(time.perf_counter() - started, 3),
        "heavy": heavy_results,
    }


def bad_requests(key: str) -> list[tuple[str, bytes]]:
    """(name, raw HTTP/1.1 request) of inputs a careless or hostile client sends; none may get a 5xx."""
    def req(method: str, path: str, body: bytes = b"", headers: bytes = b"") -> bytes:
        return (f"{method} {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n".encode() + headers
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    auth = f"x-api-key: {key}\r\n".encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("integer_of_5000_digits", req("POST", "/query", b'{"textual_query":"x","limit":1' + b"0" * 5000 + b"}", auth)),
        ("metric_of_400_digits", req("POST", "/ingest", b'{"entity_id":"p","textual_content":"x","metrics":{"m":1'
                                     + b"0" * 400 + b"}}", auth)),
        ("nan_literal", req("POST", "/query", b'{"textual_query":"x","limit":NaN}', auth)),
        ("nesting_100k_deep", req("POST", "/ingest", deep, auth)),
        ("lone_surrogate", req("POST", "/ingest", b'{"entity_id":"p","textual_content":"\\ud800"}', auth)),
        ("not_utf8_body", req("POST", "/ingest", b'{"entity_id":"p","textual_content":"\xff\xfe"}', auth)),
        ("not_utf8_key", req("POST", "/query", b'{"textual_query":"x"}', b"x-api-key: \xff\xfe\xfd\r\n")),
        ("not_utf8_bearer", req("POST", "/query", b'{"textual_query":"x"}', b"Authorization: Bearer \xc3\x28\r\n")),
        ("gzip_that_is_not", req("POST", "/ingest", b"not gzip at all", auth + b"Content-Encoding: gzip\r\n")),
        ("unknown_encoding", req("POST", "/ingest", b"{}", auth + b"Content-Encoding: snappy\r\n")),
        ("empty_body", req("POST", "/ingest", b"", auth)),
        ("array_body", req("POST", "/memory/delete", b"[1,2,3]", auth)),
        ("bad_percent_encoding", req("GET", "/temporal/query?entity_id=%ZZ%ud800&limit=%FF", b"", auth)),
        ("repeated_parameter", req("GET", "/profile?entity_id=a&entity_id=b", b"", auth)),
        ("huge_limit", req("GET", "/temporal/query?limit=" + "9" * 5000, b"", auth)),
        ("wrong_method", req("DELETE", "/ingest", b"", auth)),
        ("snapshot_of_no_shard", req("POST", "/admin/shards/99999/snapshot", b"", auth)),
    ]


async def raw_status(url: str, request: bytes, timeout_s: float = 60.0) -> int:
    """Send raw bytes to the engine (no client library to tidy them up); the answer's status, 0 if none."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    try:
        writer.write(request)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    finally:
        writer.close()


async def bad_inputs(client: Client, **_: Any) -> dict[str, Any]:
    """Each hostile request's status: every one must get a 4xx (a 5xx or no answer is a defect)."""
    statuses = {name: await raw_status(client.url, request) for name, request in bad_requests(client.key)}
    return {"statuses": statuses, "defects": sorted(n for n, s in statuses.items() if not 400 <= s < 500)}


async def one_id_races(client: Client, writers: int = 16, rounds: int = 3, prefix: str = "probe", **_: Any) -> dict:
    """`writers` clients write one free-form memory id under as many entities at once; afterwards
    exactly one entity may hold it (an id names one memory), and inspect must agree."""
    entities = [f"{prefix}-racer-{i}-{uuid.uuid4().hex[:6]}" for i in range(writers)]
    results = []
    for _ in range(rounds):
        memory_id = f"{prefix}-shared-{uuid.uuid4().hex}"
        answers = await asyncio.gather(*(client.post("/ingest", {
            "entity_id": e, "memory_id": memory_id, "textual_content": f"the shared note by {e}"}) for e in entities))
        holders = []
        for e in entities:
            status, hits, _ = await client.post("/query", {"textual_query": "the shared note", "entity_id": e,
                                                          "limit": 50})
            if status == 200 and any(h["memory_id"] == memory_id for h in hits):
                holders.append(e)
        status, found, _ = await client.post("/memory/inspect", {"memory_id": memory_id})
        results.append({"memory_id": memory_id, "statuses": sorted({a[0] for a in answers}), "holders": len(holders),
                        "inspect_agrees": status == 200 and [found.get("entity_id")] == holders})
    return {"rounds": results, "defects": [r for r in results if r["holders"] != 1 or not r["inspect_agrees"]
                                           or r["statuses"] != [201]]}


Probe = Callable[..., Awaitable[dict[str, Any]]]
PROBES: dict[str, Probe] = {"heavy_inputs": heavy_inputs, "bad_inputs": bad_inputs, "one_id_races": one_id_races}


async def run(url: str, key: str, names: list[str] | None = None, **options: Any) -> dict[str, Any]:
    """Run the named probes (all by default) one after another; {name: result}."""
    async with aiohttp.ClientSession() as session:
        client = Client(session, url.rstrip("/"), key)
        return {name: await PROBES[name](client, **options) for name in (names or list(PROBES))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--key", required=True)
    ap.add_argument("--probe", action="append", choices=sorted(PROBES), help="run only this probe (repeatable)")
    ap.add_argument("--limits", type=json.loads, default=None,
                    help='the engine\'s limits if not the defaults, as JSON: {"max_text_chars": 32768, ...}')
    args = ap.parse_args(argv)
    options = {"limits": args.limits} if args.limits else {}
    print(json.dumps(asyncio.run(run(args.url, args.key, args.probe, **options)), indent=2))


if __name__ == "__main__":
    sys.exit(main())
