"""Scale-out: ingest and query throughput with one, two and three `tellodb node`s through the same routers.

Each run starts a fresh multi-machine-shaped cluster on this machine (loadtest.local_cluster): a
head, K nodes, each pinned to one core (`taskset -c`, node i on core i mod the machine's cores,
with `--cpus 1`, so one embedding thread each), and two routers. Then, through both routers:
bulk ingest (`--clients` clients sending batches of 32 texts to entities spread over every
shard) and queries (`--clients` clients, one entity-scoped query each at a time), `--seconds`
each. Reported: items/s per K and the ratio to K=1, with the CPU seconds each role used, since
routers and the load generator run on the same cores as the nodes here.

    python loadtest/scale_nodes.py --tag 2core
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

from tellodb import IngestItem, TellodbClient  # noqa: E402

from loadtest.local_cluster import LocalCluster  # noqa: E402
from loadtest.mixed_load import WORDS, text_for  # noqa: E402

KEY = "bench-key-0123456789"
RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32


def own_cpu_seconds() -> float:
    """This process's own CPU seconds (not its children: the cluster's processes are its children)."""
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process and all its descendants (live ones), from /proc."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
            except OSError:
                continue
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def drive(urls: list[str], clients: int, seconds: float, kind: str, entities: int) -> dict:
    counts = [0] * clients
    errors = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        c = TellodbClient.from_cloud(base_url=urls[i % len(urls)], api_key=KEY, timeout=120)
        n = 0
        while time.monotonic() < stop:
            entity = f"scale:user-{(i * 7919 + n) % entities}"
            try:
                if kind == "ingest":
                    c.ingest_many([IngestItem(entity_id=entity, text=text_for(entity, n * BATCH + j))
                                   for j in range(BATCH)], batch_size=BATCH)
                    counts[i] += BATCH
                else:
                    c.query(" ".join(WORDS[(n + k) % len(WORDS)] for k in range(3)), entity_id=entity, top_k=5)
                    counts[i] += 1
            except Exception:
                errors[i] += 1
            n += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    return {"items": sum(counts), "errors": sum(errors), "seconds": round(elapsed, 2),
            "items_per_second": round(sum(counts) / elapsed, 1)}


def one_run(k: int, args: argparse.Namespace, seed: Path, root: Path) -> dict:
    names = [f"n{i + 1}" for i in range(k)]
    cores = os.cpu_count() or 1
    cluster = LocalCluster(root / f"k{k}", KEY, shards=args.shards, nodes=tuple(names), model_seed=seed)
    try:
        cluster.start_head()
        cluster.start_nodes(names, cpus=1, taskset={n: str(i % cores) for i, n in enumerate(names)})
        routers = cluster.start_routers(2)
        urls = [r.url for r in routers]
        drive(urls, 4, 5, "ingest", args.entities)  # warm-up: every node's model and shards
        time.sleep(3)
        roles = {"nodes": [cluster.procs[n].popen.pid for n in names], "routers": [r.popen.pid for r in routers]}
        before = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
        before["load generator"] = own_cpu_seconds()
        wall = time.monotonic()
        ingest = drive(urls, args.clients, args.seconds, "ingest", args.entities)
        time.sleep(3)  # the write-behind indexer catches up before queries are timed
        query = drive(urls, args.clients, args.seconds, "query", args.entities)
        after = {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}
        after["load generator"] = own_cpu_seconds()
        wall = time.monotonic() - wall
    finally:
        cluster.close()
    return {"nodes": k, "ingest": ingest, "query": query, "wall_seconds": round(wall, 1),
            "cpu_seconds": {role: round(after[role] - before[role], 1) for role in after}}


def write(report: dict) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"scale-nodes-{report['tag']}"
    paths = [RESULTS / f"{name}.json", RESULTS / f"{name}.md", RESULTS / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    runs = report["runs"]
    base = runs[0]
    lines = [f"# Scale-out over `tellodb node`s ({report['tag']})", "",
             f"Each node pinned to one core of this {report['machine']['cpus']}-core machine; two routers; "
             f"{report['clients']} clients for {report['seconds']:.0f} s per operation; batches of {BATCH} texts for "
             "ingest, one entity-scoped query per request.", "",
             "| nodes | ingest texts/s | ratio to 1 node | queries/s | ratio to 1 node | errors | CPU s: nodes / routers / load generator (of wall s x cores) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        cpu = r["cpu_seconds"]
        lines.append(f"| {r['nodes']} | {r['ingest']['items_per_second']} | "
                     f"{r['ingest']['items_per_second'] / base['ingest']['items_per_second']:.2f} | "
                     f"{r['query']['items_per_second']} | "
                     f"{r['query']['items_per_second'] / base['query']['items_per_second']:.2f} | "
                     f"{r['ingest']['errors'] + r['query']['errors']} | "
                     f"{cpu['nodes']} / {cpu['routers']} / {cpu['load generator']} "
                     f"(of {r['wall_seconds']} x {report['machine']['cpus']}) |")
    lines += ["", f"![throughput by nodes]({paths[2].name})", ""]
    paths[1].write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = [r["nodes"] for r in runs]
    for op in ("ingest", "query"):
        ax.plot(ks, [r[op]["items_per_second"] / base[op]["items_per_second"] for r in runs], "o-", label=op)
    ax.plot(ks, ks, ":", color="grey", label="linear")
    ax.set_xticks(ks)
    ax.set_xlabel("tellodb nodes (one core each)")
    ax.set_ylabel("throughput, ratio to one node")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,3")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--entities", type=int, default=512)
    parser.add_argument("--tag", default="2core")
    args = parser.parse_args()
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.onnx_embedder import export_onnx

    root = Path(tempfile.mkdtemp(prefix="scale-nodes-"))
    seed = root / "seed"
    export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), "onnx")
    runs = []
    for k in (int(x) for x in args.nodes.split(",")):
        runs.append(one_run(k, args, seed, root))
        print(json.dumps(runs[-1]), file=sys.stderr)
    report = {"tag": args.tag, "machine": {"cpus": os.cpu_count()}, "clients": args.clients,
              "seconds": args.seconds, "runs": runs}
    for p in write(report):
        print(p)


if __name__ == "__main__":
    main()
