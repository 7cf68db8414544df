"""Global against entity queries as the shard count grows: p50 of a query with `entity_id` and of the
same kind of query without it (every node, every shard), one client, through `tellodb serve`.

    python loadtest/global_query.py --memories 100000 --shards 16,64,256 --out loadtest/results/global-query-2core

With `--prefix P` it also times a third kind, the query of a read key scoped to the entity-id
prefix P (written into the data directory's keys file): no `entity_id`, every node, but only the
entities P admits (`user-1`: 111 of 1,000 entities).

For each shard count it writes the data set straight into a fresh data directory with the engine's
own store (node.store.ShardStore: SQLite, FTS and Chroma, indexed), so a run does not spend most of
its time embedding 100,000 memories once per shard count: the memories' vectors are embedded once
with the engine's ONNX embedder and kept in `--vectors` for the next run. Then it starts
`tellodb serve` on that directory (2 nodes by default), warms it, waits for the nodes' vector
blocks to settle into their 4-bit scans (node/node_vectors.py: a read-mostly node's steady state),
and times `--queries` queries of each kind, interleaved, each with a new text (no embedding-cache
hits). Figures, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Engine, add_engine_arguments, log, percentile  # noqa: E402
from texts import query_text, sentence  # noqa: E402
from node.node_vectors import SEAL_AFTER_S  # noqa: E402


def texts_of(n: int) -> list[str]:
    rng = random.Random(7)
    return [sentence(rng, i) for i in range(n)]


def vectors_of(texts: list[str], path: Path, random_vectors: bool = False) -> np.ndarray:
    """The texts' vectors, from `path` when an earlier run saved them; or random unit vectors: the
    same cost for a search while shards are scanned exactly (up to SHARD_EXACT_SCAN memories each),
    not the same answers (timing, not recall)."""
    if random_vectors:
        rng = np.random.default_rng(7)
        vectors = rng.standard_normal((len(texts), 384)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    if path.exists():
        vectors = np.load(path)
        if len(vectors) == len(texts):
            return vectors
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.embedder import load_embedder

    cache = tempfile.mkdtemp(prefix="tellodb-bench-model-")
    embedder = load_embedder(resolve_model_path(DEFAULT_MODEL, cache), "onnx", "cpu", os.cpu_count() or 1, cache)
    started = time.perf_counter()
    vectors = np.concatenate([embedder.encode(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    log(f"embedded {len(texts)} texts in {time.perf_counter() - started:.0f} s")
    np.save(path, vectors)
    shutil.rmtree(cache, ignore_errors=True)
    return vectors


def build(data_dir: Path, shards: int, texts: list[str], vectors: np.ndarray, entities: int) -> None:
    """Write the memories into `data_dir`'s shards, indexed, as the engine's nodes would."""
    from node.ids import shard_of
    from node.shard_set import shard_dir
    from node.store import MemoryRecord, ShardStore

    by_shard: dict[int, list[MemoryRecord]] = {}
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        entity = f"user-{i % entities}"
        by_shard.setdefault(shard_of(entity, shards), []).append(MemoryRecord(
            f"{entity}::s::{i}", entity, "s", i, 1_700_000_000_000 + i * 1000, None, text, (), vector))
    started = time.perf_counter()
    for shard, records in sorted(by_shard.items()):
        store = ShardStore(shard_dir(data_dir, shard), shard, vectors.shape[1])
        for j in range(0, len(records), 5000):
            store.upsert(records[j:j + 5000])
        while store.index_pending():
            pass
        store.close()
    log(f"{shards} shards written in {time.perf_counter() - started:.0f} s")


async def measure(base: str, key: str, queries: int, entities: int, seed: int, scoped: tuple[str, str] | None = None) -> dict:
    """p50 and p95 per kind of query: `entity`, `global`, and with `scoped` (prefix, key) `prefix`."""
    rng = random.Random(seed)
    kinds = ["entity", "global"] + (["prefix"] if scoped else [])
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}
    stages: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}  # kind -> stage -> ms (x-tm-*-us)
    headers = {"x-api-key": key}
    async with aiohttp.ClientSession(headers=headers) as s:
        for _ in range(600):  # every node has opened its shards
            async with s.get(f"{base}/ready") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.5)

        async def one(kind: str) -> None:
            body = {"textual_query": query_text(rng) + f" {rng.randrange(10**9)}", "limit": 10}
            if kind == "entity":
                body["entity_id"] = f"user-{rng.randrange(entities)}"
            t = time.perf_counter()
            async with s.post(f"{base}/query/semantic", json=body,
                              headers={"x-api-key": scoped[1]} if kind == "prefix" else None) as r:
                hits = await r.json()
                if r.status != 200 or not hits:
                    raise SystemExit(f"{kind} query failed: {r.status} {hits}")
                if kind == "prefix" and not all(h["entity_id"].startswith(scoped[0]) for h in hits):
                    raise SystemExit(f"a query of a key scoped to {scoped[0]!r} saw other entities")
            latencies[kind].append((time.perf_counter() - t) * 1000)
            for name, value in r.headers.items():
                if name.startswith("x-tm-") and name.endswith("-us"):
                    stages[kind].setdefault(name[5:-3], []).append(int(value) / 1000)

        for _ in range(20):  # warm: every shard's matrix and index loaded, Ray's workers up
            for kind in reversed(kinds):
                await one(kind)
        # A read-mostly node's steady state: blocks of vectors unchanged for SEAL_AFTER_S are scanned
        # as 4-bit codes (node/node_vectors.py), built on a thread; the next queries take them.
        await asyncio.sleep(SEAL_AFTER_S + 2)
        for _ in range(5):
            for kind in reversed(kinds):
                await one(kind)
        latencies = {kind: [] for kind in kinds}
        stages = {kind: {} for kind in kinds}
        for _ in range(queries):
            for kind in kinds:
                await one(kind)
    out = {kind: {"p50_ms": round(percentile(v, 50), 2), "p95_ms": round(percentile(v, 95), 2), "n": len(v),
                  "stage_p50_ms": {stage: round(percentile(ms, 50), 2) for stage, ms in stages[kind].items()}}
           for kind, v in latencies.items()}
    out["global_over_entity_p50"] = round(out["global"]["p50_ms"] / out["entity"]["p50_ms"], 2)
    if scoped:
        out["prefix"]["prefix"] = scoped[0]
        out["prefix_over_entity_p50"] = round(out["prefix"]["p50_ms"] / out["entity"]["p50_ms"], 2)
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    shards = [r["shards"] for r in rows]
    for kind in ("entity", "global"):
        ax.plot(shards, [r[kind]["p50_ms"] for r in rows], marker="o", label=f"{kind} query p50")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shards, [str(s) for s in shards])
    ax.set_xlabel("shards (2 nodes)")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{rows[0]['memories']:,} memories, one client")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(ap)
    ap.add_argument("--memories", type=int, default=100_000)
    ap.add_argument("--entities", type=int, default=1000)
    ap.add_argument("--shards", default="16,64,256")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200, help="of each kind, per shard count")
    ap.add_argument("--vectors", default=None, help="where the memories' vectors are kept between runs")
    ap.add_argument("--random-vectors", action="store_true", help="random unit vectors instead of embedding the "
                    "memories (timing only; see vectors_of)")
    ap.add_argument("--prefix", help="also time the queries of a read key scoped to this entity-id prefix")
    args = ap.parse_args()
    args.spawn = True
    texts = texts_of(args.memories)
    vectors = vectors_of(texts, Path(args.vectors or f"{tempfile.gettempdir()}/tellodb-bench-vectors-{args.memories}.npy"),
                         args.random_vectors)
    rows = []
    for shards in [int(s) for s in args.shards.split(",")]:
        data_dir = Path(tempfile.mkdtemp(prefix="tellodb-bench-global-"))
        build(data_dir, shards, texts, vectors, args.entities)
        scoped = None
        if args.prefix:
            from router.datadir import keys_path
            from router.keys import Key, add

            scoped = (args.prefix, add(keys_path(None, str(data_dir)), Key("bench-tenant", "read", (args.prefix,))))
        env = {"TELLODB_SHARDS": str(shards), "TELLODB_NODES": str(args.nodes)}
        with Engine(args, data_dir=str(data_dir), env=env) as engine:
            row = {"memories": args.memories, "entities": args.entities, "shards": shards, "nodes": args.nodes,
                   "vectors": "random" if args.random_vectors else "embedded",
                   **asyncio.run(measure(engine.base, args.key, args.queries, args.entities, shards, scoped))}
            engine.stop()
        log(json.dumps(row))
        rows.append(row)
    result = {"benchmark": "global-query", "cpus": os.cpu_count(), "rows": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        prefix = f"key scoped to `{args.prefix}`" if args.prefix else None
        lines = ["| shards | entity p50 ms | global p50 ms | global / entity | entity p95 | global p95 |"
                 + (f" {prefix}: p50 ms | its p95 | over entity |" if prefix else ""),
                 "|---|---|---|---|---|---|" + ("---|---|---|" if prefix else "")]
        lines += [f"| {r['shards']} | {r['entity']['p50_ms']} | {r['global']['p50_ms']} | {r['global_over_entity_p50']} "
                  f"| {r['entity']['p95_ms']} | {r['global']['p95_ms']} |"
                  + (f" {r['prefix']['p50_ms']} | {r['prefix']['p95_ms']} | {r['prefix_over_entity_p50']} |" if prefix else "")
                  for r in rows]
        out.with_suffix(".md").write_text(f"# Global against entity queries: {args.memories:,} memories, {args.nodes} nodes, "
                                          f"one client\n\n" + "\n".join(lines) + "\n")
        plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
