"""Query latency while the write-behind indexer works through a bulk import's backlog.

    python loadtest/backlog_latency.py --spawn --memories 20000 --out-dir loadtest/results

After a bulk import the vectors reach Chroma behind the writes (node/indexer.py), and indexing
chunks share each node's store thread with searches. The run:

1. quiet: one client's queries (`--queries`) with no backlog;
2. import `--memories` through `/ingest/batch` and time how long the backlog left at its end takes
   to drain with no query waiting (`/stats` polled every 0.1 s);
3. `--rounds` times: import `--memories` again, and from the moment its last batch is answered one
   client queries back to back for `--window` seconds, while the indexer works through the backlog
   the import left (up to 127 rows a shard: node/indexer.py); `/stats` is not polled meanwhile (it
   runs on the store thread too);
4. after 20 quiet seconds, the quiet queries again.

Goals (issue 14): p99 during the backlog within 1.5x of the quiet p99 twenty seconds after the
last import (on the same data), and the backlog drained as
fast as before when no query waits (the drain time of step 2, against a run of the code before).
JSON and Markdown go to `--out-dir`.
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


def latency_summary(lat: list[float]) -> dict:
    return {"p50_ms": round(percentile(lat, 50) * 1000, 2), "p99_ms": round(percentile(lat, 99) * 1000, 2),
            "max_ms": round(max(lat) * 1000, 2)}


async def queries(s: aiohttp.ClientSession, base: str, names: list[str], rng: random.Random,
                  count: int | None = None, seconds: float | None = None, raw: bool = False):
    """One client's queries back to back: `count` of them, or for `seconds`. With `raw`, the
    latencies themselves (None for an error)."""
    lat: list[float | None] = []
    end = time.perf_counter() + (seconds or 1e9)
    while (count is None or len(lat) < count) and time.perf_counter() < end:
        t = time.perf_counter()
        async with s.post(f"{base}/query/semantic", json={"textual_query": query_text(rng),
                                                          "entity_id": rng.choice(names), "limit": 10}) as r:
            await r.read()
            lat.append(time.perf_counter() - t if r.status == 200 else None)
    if raw:
        return lat
    ok = [x for x in lat if x is not None]
    return {"queries": len(lat), "errors": len(lat) - len(ok), **latency_summary(ok)}


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
        drain_a = await drained(s, engine.base, poll_s=0.1)
        log(f"import A: {import_a:.1f} s, its backlog drained in {drain_a:.2f} s with no queries")

        windows, imports, left = [], [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            await preload_memories(s, engine.base, names, args.memories, rng, offset=2000 + (r + 1) * args.memories)
            imports.append(round(time.perf_counter() - t0, 1))
            windows.append(await queries(s, engine.base, names, rng, seconds=args.window, raw=True))
            left.append(await backlog(s, engine.base))
            await drained(s, engine.base)
        lat = [x for w in windows for x in w]
        during = {"queries": len(lat), "errors": sum(1 for x in lat if x is None),
                  **latency_summary([x for x in lat if x is not None])}
        log(f"{args.rounds} imports, then {args.window} s of queries each: {during}; backlog after: {left}")
        await asyncio.sleep(20)
        after = await queries(s, engine.base, names, rng, count=args.queries)
        log(f"after 20 s: {after}")
    return {
        "name": args.name, "machine": {"python": platform.python_version()}, "memories_per_import": args.memories,
        "entities": args.entities, "rounds": args.rounds, "window_s": args.window, "quiet": quiet,
        "during_backlog": during, "after_20s": after, "import_a_s": round(import_a, 1), "drain_a_s": round(drain_a, 2),
        "imports_s": imports, "backlog_after_windows": left,
        "p99_during_over_quiet": round(during["p99_ms"] / quiet["p99_ms"], 2),
        "p99_during_over_after": round(during["p99_ms"] / after["p99_ms"], 2),
    }


def write_reports(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = result["name"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [(k, result[k]) for k in ("quiet", "during_backlog", "after_20s")]
    lines = [f"# Query latency during an indexing backlog ({result['rounds']} imports of "
             f"{result['memories_per_import']:,} memories)", "",
             f"- p99 in the {result['window_s']} s after each import against quiet 20 s after the last import (the "
             f"same data): **{result['p99_during_over_after']}x** (goal: at most 1.5x); against quiet before the "
             f"imports (a twentieth of the data): {result['p99_during_over_quiet']}x",
             *([f"- code: {result['code']}"] if "code" in result else []),
             f"- the backlog an import left, drained with no queries waiting: {result['drain_a_s']} s",
             f"- rows still unindexed after each query window: {result['backlog_after_windows']}", "",
             "| phase | queries | errors | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['queries']} | {v['errors']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |" for k, v in rows]
    if plot(rows, result, out / f"{name}.png"):
        lines += ["", f"![{name}.png]({name}.png)"]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[tuple[str, dict]], result: dict, path: Path) -> bool:
    """Bars of p50 and p99 per phase (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [v["p50_ms"] for _, v in rows], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [v["p99_ms"] for _, v in rows], width=0.4, label="p99")
    ax.set_xticks(list(xs), [k.replace("_", " ") for k, _ in rows])
    ax.set_ylabel("one client's query latency (ms)")
    ax.set_title(result.get("code", result["name"]), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(ap)
    ap.add_argument("--memories", type=int, default=10000, help="memories per import")
    ap.add_argument("--rounds", type=int, default=3, help="imports followed by a query window")
    ap.add_argument("--window", type=float, default=3.0, help="seconds of queries after each import")
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
