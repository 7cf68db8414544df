"""Shard split under load: how long a split takes, its write fence, write and query latency meanwhile.

A multi-machine-shaped cluster on this machine (loadtest.local_cluster: a head, two `tellodb node`s
of one CPU share each, one router; `--shards` shards) is loaded with `--memories` memories over
`--entities` entities; then one client queries entities and one client writes single memories,
both without pause, while `tellodb cluster split <the largest shard>` splits the shard in two and
waits for the moves that place the new shard. Reported, all in one run: the split's seconds, its
copy seconds, memories/s (the shard's memories over the split's seconds), the write fence, the
write and query latency p50/p99 before and during the split (the writes to the splitting shard's
entities apart as well), the clients' errors and the shard count before and after. JSON and
Markdown (and a PNG, with matplotlib, the `loadtest` extra) go to loadtest/results/split-<tag>.*.

    python loadtest/split_bench.py --memories 20000 --tag 2core
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tellodb import TellodbClient  # noqa: E402

from loadtest.local_cluster import LocalCluster  # noqa: E402
from loadtest.mixed_load import text_for  # noqa: E402
from loadtest.move_bench import KEY, RESULTS, Querier, percentile, preload  # noqa: E402


class Writer(threading.Thread):
    """One client writing single memories over the entities without pause; (start time, seconds, ok,
    entity) per write, and the first errors' messages."""

    def __init__(self, url: str, entities: int, first: int) -> None:
        super().__init__(daemon=True)
        self.client = TellodbClient.from_cloud(base_url=url, api_key=KEY, timeout=60)
        self.entities = entities
        self.first = first  # numbers the texts after the preload's
        self.samples: list[tuple[float, float, bool, str]] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            entity = f"bench:user-{n % self.entities}"
            started = time.monotonic()
            try:
                self.client.ingest(entity_id=entity, text=text_for(entity, self.first + n),
                                   memory_id=f"{entity}::live::{n}")
                ok = True
            except Exception as exc:
                ok = False
                if len(self.errors) < 10:
                    self.errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            self.samples.append((started, time.monotonic() - started, ok, entity))
            n += 1

    def between(self, a: float, b: float, entities: set[str] | None = None) -> list[float]:
        return [s * 1000 for t, s, ok, e in self.samples
                if a <= t < b and ok and (entities is None or e in entities)]


def lat(xs: list[float], seconds: float) -> dict:
    return {"requests": len(xs), "per_second": round(len(xs) / seconds, 1) if seconds else None,
            "p50_ms": round(percentile(xs, 0.5), 2), "p99_ms": round(percentile(xs, 0.99), 2),
            "max_ms": round(max(xs, default=float("nan")), 2)}


def ratio(during: list[float], before: list[float], q: float) -> float | None:
    return round(percentile(during, q) / percentile(before, q), 2) if during and before else None


def primaries(stats: dict) -> dict[int, dict]:
    """Each primary shard's counts, from GET /stats."""
    return {int(s): info for node in stats["nodes"].values() if node
            for s, info in node["per_shard"].items() if info["role"] == "primary"}


def run(args: argparse.Namespace) -> dict:
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.ids import shard_of
    from node.onnx_embedder import export_onnx

    root = Path(tempfile.mkdtemp(prefix="split-bench-"))
    seed = root / "seed"
    export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), "onnx")
    cluster = LocalCluster(root / "cluster", KEY, shards=args.shards, nodes=("n1", "n2"), model_seed=seed)
    querier = writer = None
    try:
        cluster.start_head()
        cluster.start_nodes(["n1", "n2"], cpus=1)
        [router] = cluster.start_routers(1)
        load_s = preload(router.url, args.memories, args.entities)
        print(f"preloaded {args.memories} memories in {load_s:.0f} s", file=sys.stderr)
        time.sleep(5)  # the indexer settles after the preload
        admin = TellodbClient.from_cloud(base_url=router.url, api_key=KEY, timeout=120)
        before_shards = primaries(admin.get_stats())
        shard = max(before_shards, key=lambda s: before_shards[s]["memories"])
        status_before = json.loads(cluster.cli("cluster", "status", "--json", "--url", router.url, "--key",
                                               KEY).stdout)
        # the splitting shard's entities (the placement before the split is hash % shards)
        in_shard = {f"bench:user-{e}" for e in range(args.entities)
                    if shard_of(f"bench:user-{e}", status_before["shards"]) == shard}
        print(f"splitting shard {shard}: {before_shards[shard]['memories']} memories, "
              f"{len(in_shard)} entities", file=sys.stderr)
        querier = Querier(router.url, args.entities)
        writer = Writer(router.url, args.entities, args.memories)
        querier.start()
        writer.start()
        time.sleep(args.baseline_s)
        split_started, split_started_wall = time.monotonic(), time.time()
        done = cluster.cli("cluster", "split", str(shard), "--url", router.url, "--key", KEY, timeout=3600)
        split_ended = time.monotonic()
        time.sleep(args.after_s)
        after_ended = time.monotonic()
        querier.halt.set()
        writer.halt.set()
        querier.join()
        writer.join()
        if done.returncode != 0:
            raise RuntimeError(f"tellodb cluster split failed:\n{done.stdout}\n{done.stderr}")
        status = json.loads(cluster.cli("cluster", "status", "--json", "--url", router.url, "--key", KEY).stdout)
        after_shards = primaries(admin.get_stats())
    finally:
        for client in (querier, writer):
            if client is not None:
                client.halt.set()
        cluster.close()

    [split] = [m for m in status["history"] if m.get("split") and m["shard"] == shard]
    moves = [m for m in status["history"] if not m.get("split") and m["started_at"] >= split["started_at"]]
    memories = sum(split["memories"].values())
    windows = {"before": (split_started - args.baseline_s, split_started), "during": (split_started, split_ended),
               "after": (split_ended, after_ended)}
    queries = {k: querier.between(a, b) for k, (a, b) in windows.items()}
    writes = {k: writer.between(a, b) for k, (a, b) in windows.items()}
    shard_writes = {k: writer.between(a, b, in_shard) for k, (a, b) in windows.items()}
    seconds = {k: b - a for k, (a, b) in windows.items()}
    acked = sum(1 for *_, ok, _ in writer.samples if ok)
    since = lambda m: (round(m["started_at"] - split_started_wall, 3),  # noqa: E731
                       round(m["finished_at"] - split_started_wall, 3))
    return {
        "tag": args.tag, "machine": {"cpus": os.cpu_count()},
        "setup": {"shards": args.shards, "memories": args.memories, "entities": args.entities, "nodes": 2,
                  "cpus_per_node": 1, "preload_seconds": round(load_s, 1), "baseline_s": args.baseline_s,
                  "after_s": args.after_s},
        "split": split, "moves": moves, "cli_stderr": done.stderr.splitlines(),
        "summary": {
            "shard": shard, "child": split["child"], "shard_memories_before": before_shards[shard]["memories"],
            "shard_entities": len(in_shard),
            "shards_before": status_before["shards"], "shards_after": status["shards"],
            "split_seconds": split["seconds"], "copy_seconds": split["copy_seconds"], "fence_ms": split["fence_ms"],
            "memories": memories, "memories_per_half": split["memories"],
            "mb": round(split["bytes"] / 1e6, 2),
            "memories_per_second": round(memories / split["seconds"], 1),
            "mb_per_second": round(split["bytes"] / 1e6 / split["seconds"], 2),
            "moves_after": len(moves), "wall_seconds": round(split_ended - split_started, 2),
            "query": {k: lat(v, seconds[k]) for k, v in queries.items()},
            "write": {k: lat(v, seconds[k]) for k, v in writes.items()},
            "write_splitting_shard": {k: lat(v, seconds[k]) for k, v in shard_writes.items()},
            "query_p50_ratio": ratio(queries["during"], queries["before"], 0.5),
            "query_p99_ratio": ratio(queries["during"], queries["before"], 0.99),
            "write_p50_ratio": ratio(writes["during"], writes["before"], 0.5),
            "write_p99_ratio": ratio(writes["during"], writes["before"], 0.99),
            "query_errors": sum(1 for _, _, ok in querier.samples if not ok),
            "write_errors": sum(1 for *_, ok, _ in writer.samples if not ok),
            "write_error_messages": writer.errors,
            # nothing lost: the primaries hold the preload and every acknowledged write
            "memories_after": sum(info["memories"] for info in after_shards.values()),
            "memories_expected": args.memories + acked,
            "halves_after": {str(s): after_shards[s]["memories"] for s in (shard, split["child"]) if s in after_shards},
        },
        "query_samples": [(round(t - split_started, 3), round(s * 1000, 2)) for t, s, ok in querier.samples if ok],
        "write_samples": [(round(t - split_started, 3), round(s * 1000, 2), e in in_shard)
                          for t, s, ok, e in writer.samples if ok],
        "split_window": since(split), "move_windows": [since(m) for m in moves],
    }


def plot(report: dict, path: Path) -> bool:
    """The PNG of both clients' latency over time; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.axvspan(*report["split_window"], color="tab:orange", alpha=0.2)
    for a, b in report["move_windows"]:
        ax.axvspan(a, b, color="tab:green", alpha=0.2)
    ax.plot([t for t, _ in report["query_samples"]], [ms for _, ms in report["query_samples"]], ".", markersize=2,
            label="queries")
    for mine, label in ((False, "writes, other shards"), (True, "writes, the splitting shard")):
        xs = [(t, ms) for t, ms, m in report["write_samples"] if m == mine]
        ax.plot([t for t, _ in xs], [ms for _, ms in xs], ".", markersize=2, label=label)
    ax.set_xlabel("seconds since `cluster split` (shaded: the split, then moves)")
    ax.set_ylabel("latency, ms")
    ax.set_yscale("log")
    ax.legend(markerscale=4)
    ax.set_title("One query client and one write client while a shard splits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(report: dict) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"split-{report['tag']}"
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md"]
    png = RESULTS / f"{name}.png"
    plotted = plot(report, png)
    if plotted:
        paths.append(png)
    else:
        print("no plot: `make loadtest-install` brings matplotlib", file=sys.stderr)
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    s, setup = report["summary"], report["setup"]
    labels = {"before": "before the split", "during": "during the split", "after": f"{setup['after_s']:g} s after"}

    def rows(key: str) -> list[str]:
        return [f"| {label} | {v['requests']} | {v['per_second']} | {v['p50_ms']} | {v['p99_ms']} | {v['max_ms']} |"
                for label, v in ((labels[k], s[key][k]) for k in labels)]

    head = ["| count | per s | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    lines = [f"# Shard split under write and query load ({report['tag']})", "",
             f"{setup['memories']} memories of {setup['entities']} entities in {setup['shards']} shards on 2 nodes; "
             f"`tellodb cluster split {s['shard']}` (the largest shard) while one client queries entities and one "
             f"writes single memories, both without pause. Each node has one CPU share of a "
             f"{report['machine']['cpus']}-core machine.", "",
             "| shard | new shard | memories | memories per half | MB | split s | copy s | fence ms | memories/s | "
             "MB/s | shards | moves after | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {s['shard']} | {s['child']} | {s['memories']} | "
             f"{' / '.join(str(v) for v in s['memories_per_half'].values())} | {s['mb']} | {s['split_seconds']} | "
             f"{s['copy_seconds']} | {s['fence_ms']} | {s['memories_per_second']} | {s['mb_per_second']} | "
             f"{s['shards_before']} -> {s['shards_after']} | {s['moves_after']} | {s['wall_seconds']} |", "",
             "| the query client " + head[0], head[1], *rows("query"), "",
             "| the write client " + head[0], head[1], *rows("write"), "",
             f"| its writes to shard {s['shard']}'s {s['shard_entities']} entities " + head[0], head[1],
             *rows("write_splitting_shard"), "",
             f"During/before: queries p50 x{s['query_p50_ratio']}, p99 x{s['query_p99_ratio']}; writes p50 "
             f"x{s['write_p50_ratio']}, p99 x{s['write_p99_ratio']}. Errors: {s['query_errors']} queries, "
             f"{s['write_errors']} writes. Memories held after: {s['memories_after']} (preload and acknowledged "
             f"writes: {s['memories_expected']}).", ""]
    if plotted:
        lines += [f"![latency during the split]({png.name})", ""]
    paths[1].write_text("\n".join(lines))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=20000)
    parser.add_argument("--entities", type=int, default=400)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--baseline-s", type=float, default=15)
    parser.add_argument("--after-s", type=float, default=5)
    parser.add_argument("--tag", default="2core")
    args = parser.parse_args()
    report = run(args)
    for p in write(report):
        print(p)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
