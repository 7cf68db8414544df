"""Replicas: write throughput and latency at replication 1 and 2, failover time, catch-up rate.

Two multi-machine-shaped clusters on this machine, one after the other in one run (a head, three
`tellodb node`s of one CPU share each, one router; loadtest.local_cluster):

1. replication 1, then 2: `--clients` clients ingest single memories for `--seconds`; items/s and
   latency percentiles, side by side.
2. (replication 2) failover: one writer per shard whose primary is on the node about to die; every
   process of that node is killed with SIGKILL; per such shard, the failover time is the longest
   wait between two acknowledged writes around the kill (the router retries, so clients see a
   slow write rather than an error: this is their last error to first success), and errors are
   counted.
3. (replication 2) catch-up: the node stays down while writes go on, then starts again; the
   catch-up rate is the changes its copies were missing over the time until `tellodb cluster
   status` shows every shard fully replicated.

    python loadtest/replication_bench.py --tag 2core
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
from node.ids import shard_of  # noqa: E402

KEY = "bench-key-0123456789"
RESULTS = Path(__file__).resolve().parent / "results"
SHARDS = 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def entity_on(shard: int, tag: str) -> str:
    n = 0
    while shard_of(f"{tag}:user-{n}", SHARDS) != shard:
        n += 1
    return f"{tag}:user-{n}"


def status(c: LocalCluster, url: str) -> dict:
    return json.loads(c.cli("cluster", "status", "--json", "--url", url, "--key", KEY).stdout)


class Writers:
    """Writer threads, each on its own entities; (start, seconds, ok, shard) per write."""

    def __init__(self, url: str, entities: list[str]) -> None:
        self.url, self.entities = url, entities
        self.samples: list[tuple[float, float, bool, int]] = []
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(e,), daemon=True) for e in entities]

    def start(self) -> "Writers":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(timeout=120)

    def _run(self, entity: str) -> None:
        client = TellodbClient.from_cloud(base_url=self.url, api_key=KEY, timeout=60)
        shard, n = shard_of(entity, SHARDS), 0
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                client.ingest(entity_id=entity, text=text_for(entity, n), memory_id=f"{entity}::w::{n}")
                ok = True
            except Exception:
                ok = False
            self.samples.append((started, time.monotonic() - started, ok, shard))
            n += 1


def throughput(c: LocalCluster, url: str, clients: int, seconds: float, tag: str) -> dict:
    writers = Writers(url, [f"{tag}:user-{i}" for i in range(clients)]).start()
    time.sleep(seconds)
    writers.stop()
    ok = [s * 1000 for _, s, good, _ in writers.samples if good]
    return {"writes": len(ok), "errors": sum(not good for *_, good, _ in writers.samples),
            "writes_per_second": round(len(ok) / seconds, 1), "p50_ms": round(percentile(ok, 0.5), 1),
            "p99_ms": round(percentile(ok, 0.99), 1)}


def start(root: Path, seed: Path, replication: int) -> tuple[LocalCluster, str]:
    c = LocalCluster(root, KEY, shards=SHARDS, nodes=("n1", "n2", "n3"), model_seed=seed,
                     extra_config={"replication": replication, "failover_after_s": 3})
    c.start_head()
    c.start_nodes(["n1", "n2", "n3"], cpus=1)
    [router] = c.start_routers(1)
    return c, router.url


def run(args: argparse.Namespace) -> dict:
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.onnx_embedder import export_onnx

    root = Path(tempfile.mkdtemp(prefix="replication-bench-"))
    seed = root / "seed"
    export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), "onnx")
    report: dict = {"tag": args.tag, "machine": {"cpus": os.cpu_count()}, "clients": args.clients,
                    "seconds": args.seconds, "throughput": {}}
    for replication in (1, 2):
        c, url = start(root / f"r{replication}", seed, replication)
        try:
            throughput(c, url, 4, 5, "warm")
            report["throughput"][str(replication)] = throughput(c, url, args.clients, args.seconds, "tp")
            print(f"replication {replication}: {report['throughput'][str(replication)]}", file=sys.stderr)
            if replication == 1:
                continue
            victim = "n2"
            before = status(c, url)
            shards = [s for s, owner in enumerate(before["owner"]) if owner == victim]
            writers = Writers(url, [entity_on(s, "fo") for s in shards]).start()
            time.sleep(3)
            killed = time.monotonic()
            c.kill(victim)
            time.sleep(args.outage_s)
            during = status(c, url)
            c.start_nodes([victim], cpus=1)
            restarted = time.monotonic()
            while status(c, url)["under_replicated"]:
                time.sleep(0.5)
            caught_up = time.monotonic()
            writers.stop()
            after = status(c, url)
        finally:
            c.close()
    # Clients see no error (the router retries), so a shard's failover time is the longest wait for an
    # acknowledgement around the kill: the widest gap between successive acknowledged writes to it.
    failover = {}
    for shard in shards:
        done = sorted(t + s for t, s, ok, sh in writers.samples if sh == shard and ok and killed - 1 <= t + s)
        gaps = [b - a for a, b in zip(done, done[1:]) if a <= killed + args.outage_s]
        failover[shard] = round(max(gaps), 2) if gaps else None
    # Changes the victim's copies missed: each shard's seq just before the restart (on its primary then)
    # less that copy's seq just before the kill.
    seq_then = {d["shard"]: d["seq"] or 0 for d in during["shards_detail"]}
    behind = sum(seq_then[d["shard"]] - (c_["seq"] or 0) for d in before["shards_detail"] for c_ in d["copies"]
                 if c_["node"] == victim)
    report["failover"] = {
        "victim": victim, "shards": shards, "seconds_to_first_ack": failover,
        "max_s": max((v for v in failover.values() if v is not None), default=None),
        "writes_during_outage": sum(1 for t, _, ok, _ in writers.samples if ok and killed <= t < restarted),
        "client_errors": sum(1 for _, _, ok, _ in writers.samples if not ok), "failovers": during["failovers"]}
    report["catch_up"] = {"outage_s": round(restarted - killed, 1), "seconds": round(caught_up - restarted, 1),
                          "changes_behind": behind, "epoch_after": after["epoch"],
                          "changes_per_second": round(behind / (caught_up - restarted), 1) if caught_up > restarted
                          else None}
    return report


def write(report: dict) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"replication-{report['tag']}"
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    t1, t2 = report["throughput"]["1"], report["throughput"]["2"]
    f, cu = report["failover"], report["catch_up"]
    lines = [f"# Replicas ({report['tag']})", "",
             f"Three nodes of one CPU share each on a {report['machine']['cpus']}-core machine, one router, "
             f"{report['clients']} clients ingesting single memories for {report['seconds']:.0f} s.", "",
             "| replication | writes/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|",
             f"| 1 | {t1['writes_per_second']} | {t1['p50_ms']} | {t1['p99_ms']} | {t1['errors']} |",
             f"| 2 | {t2['writes_per_second']} | {t2['p50_ms']} | {t2['p99_ms']} | {t2['errors']} |", "",
             f"Replication 2 / 1: throughput x{t2['writes_per_second'] / t1['writes_per_second']:.2f}, "
             f"p50 x{t2['p50_ms'] / t1['p50_ms']:.2f}.", "",
             f"Failover (SIGKILL of every process of {f['victim']}, primary of shards {f['shards']}): per shard, the "
             f"longest wait between acknowledged writes around the kill (clients saw no error: the router retries) "
             f"{f['seconds_to_first_ack']}, max {f['max_s']} s, with failover_after_s 3; client errors "
             f"{f['client_errors']}; writes acknowledged during the outage {f['writes_during_outage']}.", "",
             f"Catch-up: after {cu['outage_s']} s away, {cu['seconds']} s until every shard was fully replicated "
             f"again: {cu['changes_behind']} changes behind, {cu['changes_per_second']} changes/s.", ""]
    paths[1].write_text("\n".join(lines))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--outage-s", type=float, default=15)
    parser.add_argument("--tag", default="2core")
    report = run(parser.parse_args())
    for p in write(report):
        print(p)
    print(json.dumps({k: report[k] for k in ("throughput", "failover", "catch_up")}, indent=2))


if __name__ == "__main__":
    main()
