"""Query latency while the write-behind indexer works through a bulk import's backlog.

    python loadtest/backlog_latency.py --spawn --memories 20000 --out-dir loadtest/results

After a bulk import the vectors reach Chroma behind the writes (node/indexer.py), and indexing
chunks share each node's store thread with searches. The run:

1. quiet: one client's queries (`--queries`) with no backlog;
2. import `--memories` through `/ingest/batch` and time how long the backlog takes to drain with
   no query waiting (`/stats` polled once a second);
3. import as many again, then one client queries back to back for most of the drain time measured
   in 2 (`/stats` is not polled meanwhile: it runs on the store thread too), then the backlog's
   drain time with those queries is read;
4. after 20 quiet seconds, the quiet queries again.

Goals (issue 14): p99 during the backlog within 1.5x of the quiet p99, and the backlog drained as
fast as with no queries when none waits (the drain rate of step 2). JSON and Markdown go to
`--out-dir`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Engine, add_engine_arguments, log, percentile  # noqa: E402
from harness import preload_memories  # noqa: E402
from texts import query_text  # noqa: E402


async def backlog(s: aiohttp.ClientSession, base: str) -> int:
    async with s.get(f"{base}/stats") as r:
        body = await r.json()
    return sum((node or {}).get("unindexed", 0) for node in body["nodes"].values())


async def drained(s: aiohttp.ClientSession, base: str, poll_s: float = 1.0) -> float:
    """Seconds until no node has unindexed rows (polling `/stats`)."""
    t0 = time.perf_counter()
    while await backlog(s, base):
        await asyncio.sleep(poll_s)
    return time.perf_counter() - t0


async def queries(s: aiohttp.ClientSession, base: str, names: list[str], rng: random.Random,
                  count: int | None = None, seconds: float | None = None) -> dict:
    """One client's queries back to back: `count` of them, or for `seconds`."""
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + (seconds or 1e9)
    while (count is None or len(lat) < count) and time.perf_counter() < end:
        t = time.perf_counter()
        async with s.post(f"{base}/query/semantic", json={"textual_query": query_text(rng),
                                                          "entity_id": rng.choice(names), "limit": 10}) as r:
            await r.read()
            errors += r.status != 200
        lat.append(time.perf_counter() - t)
    return {"queries": len(lat), "errors": errors, "p50_ms": round(percentile(lat, 50) * 1000, 2),
            "p99_ms": round(percentile(lat, 99) * 1000, 2), "max_ms": round(max(lat) * 1000, 2)}


async def run(args: argparse.Namespace, engine: Engine) -> dict:
    rng = random.Random(23)
    names = [f"backlog:{i}" for i in range(args.entities)]
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers={"x-api-key": args.key}, timeout=timeout) as s:
        await preload_memories(s, engine.base, names, 2000, rng)
        await drained(s, engine.base)
        await queries(s, engine.base, names, rng, count=50)  # warm every path up
        quiet = await queries(s, engine.base, names, rng, count=args.queries)
        log(f"quiet: {quiet}")

        t0 = time.perf_counter()
        await preload_memories(s, engine.base, names, args.memories, rng, offset=2000)
        import_a = time.perf_counter() - t0
        left_a = await backlog(s, engine.base)
        drain_a = await drained(s, engine.base)
        log(f"import A: {import_a:.1f} s, backlog {left_a} drained in {drain_a:.1f} s with no queries")

        t0 = time.perf_counter()
        await preload_memories(s, engine.base, names, args.memories, rng, offset=2000 + args.memories)
        import_b = time.perf_counter() - t0
        t_backlog = time.perf_counter()
        during = await queries(s, engine.base, names, rng, seconds=max(1.0, 0.8 * drain_a))
        drain_b = time.perf_counter() - t_backlog + await drained(s, engine.base, poll_s=0.25)
        log(f"import B: {import_b:.1f} s, drained in {drain_b:.1f} s with one client querying: {during}")

        await asyncio.sleep(20)
        after = await queries(s, engine.base, names, rng, count=args.queries)
        log(f"after 20 s: {after}")
    return {
        "name": args.name, "machine": {"python": platform.python_version()}, "memories_per_import": args.memories,
        "entities": args.entities, "quiet": quiet, "during_backlog": during, "after_20s": after,
        "import_a_s": round(import_a, 1), "backlog_a": left_a, "drain_a_s": round(drain_a, 1),
        "import_b_s": round(import_b, 1), "drain_b_s": round(drain_b, 1),
        "p99_during_over_quiet": round(during["p99_ms"] / quiet["p99_ms"], 2),
        "drain_time_with_queries_over_without": round(drain_b / drain_a, 2) if drain_a else None,
    }


def write_reports(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = result["name"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [(k, result[k]) for k in ("quiet", "during_backlog", "after_20s")]
    lines = [f"# Query latency during an indexing backlog ({result['memories_per_import']:,} memories per import)", "",
             f"- p99 during the backlog against quiet: **{result['p99_during_over_quiet']}x** (goal: at most 1.5x)",
             f"- backlog after import A: {result['backlog_a']:,} rows, drained in {result['drain_a_s']} s with no "
             f"queries; after import B in {result['drain_b_s']} s with one client querying "
             f"(x{result['drain_time_with_queries_over_without']})", "",
             "| phase | queries | errors | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['queries']} | {v['errors']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |" for k, v in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(ap)
    ap.add_argument("--memories", type=int, default=20000, help="memories per import")
    ap.add_argument("--entities", type=int, default=200)
    ap.add_argument("--queries", type=int, default=400, help="queries in each quiet phase")
    ap.add_argument("--out-dir", default="loadtest/results")
    ap.add_argument("--name", default="backlog-latency-2core")
    args = ap.parse_args()
    with Engine(args) as engine:
        result = asyncio.run(run(args, engine))
        result["engine"] = engine.stop()
    write_reports(result, Path(args.out_dir))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
