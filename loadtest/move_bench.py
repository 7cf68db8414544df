"""Shard moves under load: move throughput, the write fence per shard, query latency during moves.

A multi-machine-shaped cluster on this machine (loadtest.local_cluster: a head, two `tellodb node`s,
one router) is loaded with `--memories` memories; one client then queries without pause while a
third node joins and `tellodb cluster add-node` moves its share of shards to it. Reported, all in
one run: memories/s and MB/s per move and overall, the fence (writes to one shard refused, from
fence to flip) p50 and max, and the query latency during the moves against the same client's just
before. JSON, Markdown and a PNG go to loadtest/results/move-<tag>.*.

    python loadtest/move_bench.py --memories 20000 --tag 2core
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tellodb import IngestItem, TellodbClient  # noqa: E402

from loadtest.local_cluster import LocalCluster  # noqa: E402
from loadtest.mixed_load import WORDS, text_for  # noqa: E402

KEY = "bench-key-0123456789"
RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def preload(url: str, memories: int, entities: int, threads: int = 4) -> float:
    started = time.monotonic()

    def part(t: int) -> None:
        client = TellodbClient.from_cloud(base_url=url, api_key=KEY, timeout=120)
        items = [IngestItem(entity_id=f"bench:user-{n % entities}", text=text_for(f"bench:user-{n % entities}", n),
                            memory_id=f"bench:user-{n % entities}::pre::{n}")
                 for n in range(t, memories, threads)]
        client.ingest_many(items, batch_size=100)

    workers = [threading.Thread(target=part, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.monotonic() - started


class Querier(threading.Thread):
    """One client querying entities without pause; (start time, seconds, ok) per query."""

    def __init__(self, url: str, entities: int) -> None:
        super().__init__(daemon=True)
        self.client = TellodbClient.from_cloud(base_url=url, api_key=KEY, timeout=60)
        self.entities = entities
        self.samples: list[tuple[float, float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                self.client.query(WORDS[n % len(WORDS)], entity_id=f"bench:user-{n % self.entities}", top_k=5)
                ok = True
            except Exception:
                ok = False
            self.samples.append((started, time.monotonic() - started, ok))
            n += 1

    def between(self, a: float, b: float) -> list[float]:
        return [s * 1000 for t, s, ok in self.samples if a <= t < b and ok]


def run(args: argparse.Namespace) -> dict:
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.onnx_embedder import export_onnx

    root = Path(tempfile.mkdtemp(prefix="move-bench-"))
    seed = root / "seed"
    export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), "onnx")
    cluster = LocalCluster(root / "cluster", KEY, shards=args.shards, nodes=("n1", "n2"), model_seed=seed)
    try:
        cluster.start_head()
        cluster.start_nodes(["n1", "n2"], cpus=1)
        [router] = cluster.start_routers(1)
        load_s = preload(router.url, args.memories, args.entities)
        print(f"preloaded {args.memories} memories in {load_s:.0f} s", file=sys.stderr)
        cluster.start_nodes(["n3"], cpus=1)
        time.sleep(5)  # the indexer settles after the preload
        querier = Querier(router.url, args.entities)
        querier.start()
        time.sleep(args.baseline_s)
        moves_started, moves_started_wall = time.monotonic(), time.time()
        done = cluster.cli("cluster", "add-node", "n3", "--url", router.url, "--key", KEY, timeout=3600)
        moves_ended = time.monotonic()
        time.sleep(2)
        querier.halt.set()
        querier.join()
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        status = json.loads(cluster.cli("cluster", "status", "--json", "--url", router.url, "--key", KEY).stdout)
    finally:
        cluster.close()
    moves = [m for m in status["history"] if m["state"] == "done"]
    before = querier.between(moves_started - args.baseline_s, moves_started)
    during = querier.between(moves_started, moves_ended)
    total_s = sum(m["seconds"] for m in moves)
    total_bytes = sum(m["bytes"] for m in moves)
    total_memories = sum(m["memories"] for m in moves)
    fences = [m["fence_ms"] for m in moves]
    lat = lambda xs: {"queries": len(xs), "p50_ms": round(percentile(xs, 0.5), 2),  # noqa: E731
                      "p99_ms": round(percentile(xs, 0.99), 2), "max_ms": round(max(xs, default=float("nan")), 2)}
    return {
        "tag": args.tag, "machine": {"cpus": os.cpu_count()},
        "setup": {"shards": args.shards, "memories": args.memories, "entities": args.entities,
                  "nodes_before": 2, "nodes_after": 3, "cpus_per_node": 1, "preload_seconds": round(load_s, 1)},
        "moves": moves,
        "summary": {
            "shards_moved": len(moves), "wall_seconds": round(moves_ended - moves_started, 2),
            "memories_moved": total_memories, "mb_moved": round(total_bytes / 1e6, 2),
            "memories_per_second": round(total_memories / total_s, 1) if total_s else None,
            "mb_per_second": round(total_bytes / 1e6 / total_s, 2) if total_s else None,
            "fence_ms": {"p50": round(statistics.median(fences), 1) if fences else None,
                         "max": max(fences, default=None)},
            "query_before": lat(before), "query_during": lat(during),
            "query_p50_ratio": round(percentile(during, 0.5) / percentile(before, 0.5), 2) if before and during else None,
            "query_p99_ratio": round(percentile(during, 0.99) / percentile(before, 0.99), 2) if before and during else None,
            "query_errors": sum(1 for _, _, ok in querier.samples if not ok),
        },
        "query_samples": [(round(t - moves_started, 3), round(s * 1000, 2)) for t, s, ok in querier.samples if ok],
        "move_windows": [(round(m["started_at"] - moves_started_wall, 3), round(m["finished_at"] - moves_started_wall, 3))
                         for m in moves],
    }


def write(report: dict) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"move-{report['tag']}"
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md", RESULTS / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    lines = [f"# Shard moves under query load ({report['tag']})", "",
             f"{report['setup']['memories']} memories in {report['setup']['shards']} shards on 2 nodes; a third node "
             f"joins and gets its share while one client queries without pause. Each node has one CPU share of a "
             f"{report['machine']['cpus']}-core machine.", "",
             "| shards moved | memories moved | MB moved | memories/s | MB/s | fence p50 ms | fence max ms | wall s |",
             "|---|---|---|---|---|---|---|---|",
             f"| {s['shards_moved']} | {s['memories_moved']} | {s['mb_moved']} | {s['memories_per_second']} | "
             f"{s['mb_per_second']} | {s['fence_ms']['p50']} | {s['fence_ms']['max']} | {s['wall_seconds']} |", "",
             "| one client's queries | count | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|",
             *(f"| {k} | {v['queries']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |"
               for k, v in (("before the moves", s["query_before"]), ("during the moves", s["query_during"]))), "",
             f"During/before: p50 x{s['query_p50_ratio']}, p99 x{s['query_p99_ratio']}; query errors: "
             f"{s['query_errors']}.", "", "| shard | from | to | memories | bytes | copy s | index s | fence ms | total s |",
             "|---|---|---|---|---|---|---|---|---|",
             *(f"| {m['shard']} | {m['from']} | {m['to']} | {m['memories']} | {m['bytes']} | {m['copy_seconds']} | "
               f"{m.get('index_seconds')} | {m['fence_ms']} | {m['seconds']} |" for m in report["moves"]),
             "", f"![query latency during moves]({paths[2].name})", ""]
    paths[1].write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for a, b in report["move_windows"]:
        ax.axvspan(a, b, color="tab:orange", alpha=0.2)
    xs = [t for t, _ in report["query_samples"]]
    ax.plot(xs, [ms for _, ms in report["query_samples"]], ".", markersize=2)
    ax.set_xlabel("seconds since add-node (shaded: a shard moving)")
    ax.set_ylabel("query latency, ms")
    ax.set_yscale("log")
    ax.set_title("One client's queries while shards move to a new node")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=20000)
    parser.add_argument("--entities", type=int, default=400)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--baseline-s", type=float, default=15)
    parser.add_argument("--tag", default="2core")
    args = parser.parse_args()
    report = run(args)
    for p in write(report):
        print(p)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
