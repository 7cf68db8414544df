"""The lean asyncio load driver behind `python -m loadtest`: named scenarios against any engine,
with the machine's raw embedder limit measured in the same run.

Scenarios (one "iteration" per client loop):
  agent-loop   query the entity's memories, then ingest one (what an agent does per turn)
  bulk-import  POST /ingest/batch with `--batch` memories
  read-heavy   95% queries, 5% single ingests
  mixed        80% queries, 20% single ingests
  steady       80% queries, 20% upserts of the preload's ids: the data set does not grow (memory flatness)
  ingest       single ingests only
  query        queries only
Every request is timed; the run records latency per operation, throughput per second, errors,
and (for an engine it spawned) the resident memory of the engine's whole process tree.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import log, percentile  # noqa: E402
from texts import query_text, sentence  # noqa: E402

SCENARIOS = ("agent-loop", "bulk-import", "read-heavy", "mixed", "steady", "ingest", "query")


@dataclass
class Sample:
    end: float  # seconds since the run started
    op: str
    latency: float
    items: int
    ok: bool


@dataclass
class RunResult:
    scenario: str
    duration: float
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    rss_mb: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (seconds, MiB per process)
    anon_mb: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # the same, own memory only
    errors: list[str] = field(default_factory=list)


def tree_rss_mb(root_pid: int, field: str = "VmRSS") -> dict[str, float] | None:
    """Resident memory (MiB) of a process and all its descendants (the engine, Ray's processes and
    its worker processes, which Ray starts in sessions of their own), keyed "<pid> <name>", from
    /proc. `field="RssAnon"` counts only the processes' own memory (not file pages they map, such
    as SQLite's mmap of the shards, which are the OS page cache)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    if not os.path.exists(f"/proc/{root_pid}"):
        return None
    found: dict[str, float] = {}
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if field in status:
            found[f"{pid} {status['Name'].strip()}"] = int(status[field].split()[0]) / 1024
    return found


def memory_summary(samples: list[tuple[float, dict[str, float]]],
                   anon: list[tuple[float, dict[str, float]]] | None = None) -> dict | None:
    """Growth of resident memory after warm-up (the first quarter of the samples), for the whole
    tree and for every process that lived through the run; with `anon`, also of its own memory."""
    if len(samples) < 4:
        return None
    settled = samples[len(samples) // 4:]
    settled_anon = (anon or [])[len(anon or []) // 4:]
    totals = [sum(per.values()) for _, per in settled]
    procs = set.intersection(*(set(per) for _, per in settled))
    per_process = {}
    for p in sorted(procs):
        values = [per[p] for _, per in settled]
        per_process[p] = {"min_mb": round(min(values), 1), "max_mb": round(max(values), 1),
                          "growth": round(max(values) / min(values) - 1, 4)}
        own = [per[p] for _, per in settled_anon if p in per]
        if own and min(own) > 0:
            per_process[p]["anon_growth"] = round(max(own) / min(own) - 1, 4)
    return {"samples": [(t, round(sum(per.values()), 1)) for t, per in samples],
            "after_warmup_min_mb": round(min(totals), 1), "after_warmup_max_mb": round(max(totals), 1),
            "growth_after_warmup": round(max(totals) / min(totals) - 1, 4),
            "largest_process_growth": max((v["growth"] for v in per_process.values()), default=None),
            "per_process": per_process}


def steady_id(names: list[str], j: int) -> str:
    """Memory j's id in a data set of fixed ids (the `steady` scenario upserts them again)."""
    return f"{names[j % len(names)]}::s1::{j // len(names)}"


async def preload_memories(s: aiohttp.ClientSession, base: str, names: list[str], total: int,
                           rng: random.Random, batch: int = 256, writers: int = 4, offset: int = 0,
                           fixed_ids: bool = False) -> None:
    """Store `total` memories (numbered from `offset`) spread over `names` with `writers` concurrent
    /ingest/batch calls, logging progress every 5 s (a 1M preload takes a while). With `fixed_ids`
    memory j gets the id `steady_id(names, j)`; otherwise the engine makes the ids."""
    log(f"preloading {total} memories into {len(names)} entities")
    end = offset + total
    starts = iter(range(offset, end, batch))
    done, t0, last = 0, time.perf_counter(), time.perf_counter()

    async def writer() -> None:
        nonlocal done, last
        for k in starts:
            items = [{"entity_id": names[j % len(names)], "textual_content": sentence(rng, j)}
                     | ({"memory_id": steady_id(names, j)} if fixed_ids else {})
                     for j in range(k, min(k + batch, end))]
            async with s.post(f"{base}/ingest/batch", json={"items": items}) as r:
                if r.status != 201:
                    raise SystemExit(f"preload failed: {r.status} {await r.text()}")
            done += len(items)
            if time.perf_counter() - last >= 5:
                last = time.perf_counter()
                log(f"  preloaded {done}/{total}  {done / (last - t0):.0f}/s")

    await asyncio.gather(*(writer() for _ in range(writers)))
    log(f"  preloaded {total} in {time.perf_counter() - t0:.0f} s")


async def run(base: str, key: str, scenario: str, duration: float, concurrency: int, batch: int,
              entities: int, preload: int, engine_pid: int | None = None, warmup: float = 0.0,
              tag: str | None = None) -> RunResult:
    """Run `scenario` for `warmup` + `duration` seconds; only the last `duration` are recorded."""
    if scenario not in SCENARIOS:
        raise SystemExit(f"unknown scenario {scenario!r}: choose one of {', '.join(SCENARIOS)}")
    rng = random.Random(11)
    tag = tag or f"lt{int(time.time())}"  # entity names: <tag>:<i>; reuse a tag to query a preload
    names = [f"{tag}:{i}" for i in range(entities)]
    result = RunResult(scenario, duration, concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(headers={"x-api-key": key}, timeout=timeout, connector=connector) as s:
        if preload:
            await preload_memories(s, base, names, preload, rng, fixed_ids=scenario == "steady")
        started = time.perf_counter() + warmup  # samples before this are warm-up, not recorded
        stop_at = started + duration
        counter = [0]

        async def call(op: str, path: str, body: dict, items: int) -> None:
            t = time.perf_counter()
            ok = False
            try:
                async with s.post(f"{base}{path}", json=body) as r:
                    await r.read()
                    ok = r.status in (200, 201)  # 201: ingests
                    if not ok and len(result.errors) < 20:
                        result.errors.append(f"{op} -> HTTP {r.status}")
            except Exception as exc:  # a failed request is a data point, not a crash
                if len(result.errors) < 20:
                    result.errors.append(f"{op} -> {type(exc).__name__}: {exc}")
            now = time.perf_counter()
            result.samples.append(Sample(now - started, op, now - t, items, ok))  # end < 0: warm-up

        def query_body() -> dict:
            return {"textual_query": query_text(rng), "entity_id": rng.choice(names), "limit": 10}

        def ingest_body() -> dict:
            counter[0] += 1
            if scenario == "steady":  # a new text for a memory of the preload: the data does not grow
                j = rng.randrange(preload)
                return {"memory_id": steady_id(names, j), "entity_id": names[j % len(names)],
                        "textual_content": sentence(rng, counter[0])}
            return {"entity_id": rng.choice(names), "textual_content": sentence(rng, counter[0])}

        async def client() -> None:
            while time.perf_counter() < stop_at:
                if scenario == "agent-loop":
                    await call("query", "/query/semantic", query_body(), 1)
                    await call("ingest", "/ingest", ingest_body(), 1)
                elif scenario == "bulk-import":
                    items = [ingest_body() for _ in range(batch)]
                    await call("ingest_batch", "/ingest/batch", {"items": items}, batch)
                elif scenario == "ingest":
                    await call("ingest", "/ingest", ingest_body(), 1)
                elif scenario == "query":
                    await call("query", "/query/semantic", query_body(), 1)
                else:
                    share = 0.95 if scenario == "read-heavy" else 0.80
                    if rng.random() < share:
                        await call("query", "/query/semantic", query_body(), 1)
                    else:
                        await call("ingest", "/ingest", ingest_body(), 1)

        async def progress() -> None:
            if warmup:
                log(f"  warming up for {warmup:.0f} s (not recorded)")
                await asyncio.sleep(warmup)
            while time.perf_counter() < stop_at:
                await asyncio.sleep(5)
                elapsed = time.perf_counter() - started
                if engine_pid is not None:
                    rss = tree_rss_mb(engine_pid)
                    if rss is not None:
                        result.rss_mb.append((round(elapsed, 1), rss))
                        result.anon_mb.append((round(elapsed, 1), tree_rss_mb(engine_pid, "RssAnon") or {}))
                recent = [x for x in result.samples if x.end > elapsed - 5]
                lat = [x.latency for x in recent] or [0.0]
                log(f"  {elapsed:6.0f}/{duration:.0f} s  {len(recent) / 5:7.1f} req/s  "
                    f"p50 {percentile(lat, 50) * 1000:6.1f} ms  p99 {percentile(lat, 99) * 1000:6.1f} ms  "
                    f"errors {sum(not x.ok for x in result.samples)}")

        log(f"scenario {scenario}: {concurrency} clients for {duration:.0f} s")
        await asyncio.gather(progress(), *(client() for _ in range(concurrency)))
    return result


def summarise(result: RunResult) -> dict:
    """Per operation: requests, items, errors, throughput and latency percentiles; plus timelines."""
    ops: dict[str, dict] = {}
    recorded = [x for x in result.samples if x.end >= 0]
    for op in sorted({x.op for x in recorded}):
        rows = [x for x in recorded if x.op == op]
        lat = [x.latency * 1000 for x in rows if x.ok] or [0.0]
        ops[op] = {
            "requests": len(rows),
            "errors": sum(not x.ok for x in rows),
            "items_per_second": round(sum(x.items for x in rows if x.ok) / result.duration, 1),
            "requests_per_second": round(len(rows) / result.duration, 1),
            "latency_ms": {f"p{p}": round(percentile(lat, p), 2) for p in (50, 90, 95, 99)}
            | {"max": round(max(lat), 2), "mean": round(statistics.mean(lat), 2)},
        }
    seconds = int(result.duration)  # whole seconds only: the last partial one would read as a drop
    timeline = [0] * seconds
    for x in recorded:
        if x.ok and int(x.end) < seconds:
            timeline[int(x.end)] += x.items
    memory = memory_summary([(t, per) for t, per in result.rss_mb if t >= 0],
                            [(t, per) for t, per in result.anon_mb if t >= 0])
    return {"scenario": result.scenario, "duration_s": result.duration, "concurrency": result.concurrency,
            "operations": ops, "items_per_second_timeline": timeline, "engine_memory": memory,
            "warmup_errors": sum(not x.ok for x in result.samples if x.end < 0), "first_errors": result.errors}


def embedder_limit(backend: str, seconds: float = 3.0, rounds: int = 3) -> dict:
    """The raw embedder on this machine, in this process, with all its cores: batch-32 texts/s and
    single-text latency. The ceiling the engine's ingest and query throughput are compared to.

    The best of `rounds` rounds counts: a shared machine only ever makes a round slower, and the
    highest ceiling makes the engine's ratios conservative."""
    import tempfile

    from node.config import DEFAULT_MODEL, ClusterConfig, EmbeddingConfig, normalized_backend, resolve_model_path
    from node.embedder import load_embedder

    cfg = ClusterConfig(embedding=EmbeddingConfig(backend=backend))
    name = normalized_backend(cfg)
    with tempfile.TemporaryDirectory(prefix="tellodb-limit-") as cache:  # where an ONNX export goes
        embedder = load_embedder(resolve_model_path(DEFAULT_MODEL), name, "cpu", os.cpu_count() or 1, cache)
    rng = random.Random(3)
    texts = [sentence(rng, i) for i in range(32)]
    embedder.encode(texts)  # warm up
    rates, singles = [], []
    for _ in range(rounds):
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            embedder.encode(texts)
            done += len(texts)
        rates.append(done / (time.perf_counter() - t0))
        single = []
        for i in range(100):
            t = time.perf_counter()
            embedder.encode([texts[i % 32]])
            single.append(time.perf_counter() - t)
        singles.append(percentile(single, 50))
    return {"backend": name, "threads": os.cpu_count(), "batch32_per_second": round(max(rates), 1),
            "single_p50_ms": round(min(singles) * 1000, 2), "rounds_batch32_per_second": [round(r, 1) for r in rates]}
