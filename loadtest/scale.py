"""Scale run: ingest up to `--total` memories in blocks and probe query latency as the data grows.

    python loadtest/scale.py --spawn --total 1000000 --backend onnx-int8
    python loadtest/scale.py --url http://10.0.0.5:3000 --key KEY --total 200000 --block 50000

Memories go in through `/ingest/batch` (256 per call, 4 writers), spread round-robin over
`--entities` entities, so at 1M and 1,000 entities each entity holds 1,000 memories. After the
first 10,000 and after every block, writes pause for a few seconds (the index catches up) and
`--queries` single-client queries on random entities measure latency at that size. Progress goes to
stderr; JSON, Markdown and a PNG (block throughput, query p50/p99 against memories) go to
`--out-dir`. The two goals it reports on: the last block's ingest rate against the first's, and
query p99 at the end against p99 at 10,000 memories.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Engine, add_engine_arguments, log, percentile  # noqa: E402
from harness import preload_memories, tree_rss_mb  # noqa: E402
from texts import query_text  # noqa: E402


async def probe(s: aiohttp.ClientSession, base: str, names: list[str], queries: int, rng: random.Random) -> dict:
    lat = []
    for _ in range(queries):
        t = time.perf_counter()
        async with s.post(f"{base}/query/semantic", json={"textual_query": query_text(rng),
                                                          "entity_id": rng.choice(names), "limit": 10}) as r:
            await r.read()
            if r.status != 200:
                raise SystemExit(f"query failed: {r.status}")
        lat.append(time.perf_counter() - t)
    return {"p50_ms": round(percentile(lat, 50) * 1000, 2), "p99_ms": round(percentile(lat, 99) * 1000, 2)}


async def run(args: argparse.Namespace, engine: Engine) -> dict:
    rng = random.Random(17)
    names = [f"scale{int(time.time())}:{i}" for i in range(args.entities)]
    marks = sorted({10_000, *range(args.block, args.total + 1, args.block)})
    blocks, probes, done = [], [], 0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers={"x-api-key": args.key}, timeout=timeout) as s:
        for mark in marks:
            n = mark - done
            t0 = time.perf_counter()
            await preload_memories(s, engine.base, names, n, rng, offset=done)
            seconds = time.perf_counter() - t0
            done = mark
            if mark != 10_000 or args.block == 10_000:
                blocks.append({"up_to": mark, "memories": n, "seconds": round(seconds, 1),
                               "per_second": round(n / seconds, 1)})
            await asyncio.sleep(args.pause)
            p = await probe(s, engine.base, names, args.queries, rng)
            p["memories"] = mark
            if engine.proc is not None:
                rss = tree_rss_mb(engine.proc.pid) or {}
                p["rss_mb"] = round(sum(rss.values()), 1)
                own = tree_rss_mb(engine.proc.pid, "RssAnon") or {}
                p["own_mb"] = round(sum(own.values()), 1)  # the processes' own memory (not mapped files)
                p["nodes_own_mb"] = round(sum(v for k, v in own.items() if "Node" in k), 1)  # ray::PlacedNode...
                p["own_by_process"] = own
            if engine.tmp is not None:
                p["disk_gb"] = round(sum(f.stat().st_size for f in Path(engine.tmp).rglob("*") if f.is_file()) / 2**30,
                                     2)
            probes.append(p)
            log(f"{mark} memories: block {blocks[-1]['per_second'] if blocks else '-'} /s, query p50 {p['p50_ms']} ms "
                f"p99 {p['p99_ms']} ms, rss {p.get('rss_mb', '-')} MiB, nodes' own {p.get('nodes_own_mb', '-')} MiB, "
                f"disk {p.get('disk_gb', '-')} GiB")
    first, last = blocks[0], blocks[-1]
    growth = None
    if probes[0].get("nodes_own_mb") is not None:  # the node processes' own memory per memory added after 10k
        growth = round((probes[-1]["nodes_own_mb"] - probes[0]["nodes_own_mb"]) * 1024
                       / (probes[-1]["memories"] - probes[0]["memories"]), 2)
    return {"nodes_own_kib_per_memory": growth, "total": args.total, "entities": args.entities, "block": args.block, "blocks": blocks, "probes": probes,
            "last_block_slowdown": round(1 - last["per_second"] / first["per_second"], 3),
            "p99_end_over_p99_10k": round(probes[-1]["p99_ms"] / probes[0]["p99_ms"], 2)}


def markdown(report: dict, plot: str | None) -> str:
    r = report["result"]
    lines = [f"# Scale run: {r['total']:,} memories", "",
             f"Backend {report['backend']}, {report['machine']['cpus']} CPUs, {r['entities']:,} entities, "
             f"`/ingest/batch` 256 per call with 4 writers.", "",
             f"- Last block's ingest rate against the first's: {r['last_block_slowdown'] * 100:.1f}% slower "
             "(goal: at most 30%).",
             f"- Query p99 at {r['total']:,} against p99 at 10,000: {r['p99_end_over_p99_10k']}x (goal: at most 2x).",
             f"- The node processes' own memory grew by {r.get('nodes_own_kib_per_memory')} KiB per memory "
             "after the first 10,000 (README: Memory and sizing).",
             "", "| memories | block ingest /s | query p50 ms | query p99 ms | engine RSS MiB | nodes' own MiB | disk GiB |",
             "|---|---|---|---|---|---|---|"]
    rate = {b["up_to"]: b["per_second"] for b in r["blocks"]}
    for p in r["probes"]:
        lines.append(f"| {p['memories']:,} | {rate.get(p['memories'], '')} | {p['p50_ms']} | {p['p99_ms']} | "
                     f"{p.get('rss_mb', '')} | {p.get('nodes_own_mb', '')} | {p.get('disk_gb', '')} |")
    if plot:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    r = report["result"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([x["up_to"] for x in r["blocks"]], [x["per_second"] for x in r["blocks"]], marker="o")
    a.set_xlabel("memories")
    a.set_ylabel("ingest per second (block)")
    a.set_ylim(bottom=0)
    for key in ("p50_ms", "p99_ms"):
        b.plot([x["memories"] for x in r["probes"]], [x[key] for x in r["probes"]], marker="o", label=key[:3])
    b.set_xscale("log")
    b.set_xlabel("memories")
    b.set_ylabel("query latency, 1 client (ms)")
    b.set_ylim(bottom=0)
    b.legend()
    fig.suptitle(f"Scale run to {r['total']:,} memories ({report['backend']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(ap)
    ap.add_argument("--total", type=int, default=1_000_000)
    ap.add_argument("--block", type=int, default=100_000)
    ap.add_argument("--entities", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=300, help="single-client queries per probe")
    ap.add_argument("--pause", type=float, default=5.0, help="seconds between a block and its probe")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    with Engine(args) as engine:
        result = asyncio.run(run(args, engine))
        stopped = engine.stop()
    report = {"target": engine.base, "backend": args.backend or "default",
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}, "result": result, **stopped}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"scale-{args.total}-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    png = plot(report, out / f"{name}.png")
    (out / f"{name}.md").write_text(markdown(report, png.name if png else None))
    log(f"wrote {out / name}.json, .md{', .png' if png else ''}")


if __name__ == "__main__":
    main()
