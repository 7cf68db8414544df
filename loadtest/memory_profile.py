"""Where a node's memory goes, at 10k, 100k and 1M memories: one node's shards in this process.

    python loadtest/memory_profile.py --marks 10000,100000,1000000 --out-dir loadtest/results

Builds what one node process holds (the ONNX embedder, `--shards` shard stores with one vector
cache and one index budget, as node/service.py wires them) without Ray or HTTP, so each part's
memory can be told apart, and writes memories straight into the stores, so 1M memories take
minutes instead of the hour the embedder would need. The vectors are random unit vectors: an HNSW
graph's memory does not depend on the values. At each mark it indexes everything, runs queries (one
entity's scope, and whole-shard scopes that go through HNSW), and reads:

- the process's own memory (RssAnon, after `malloc_trim`, so freed pages do not count);
- SQLite's heap (`sqlite3_memory_used` of the library this Python uses: page caches, FTS5);
- the vector cache's bytes (node/vector_cache.py) and the index budget's estimate;
- the HNSW share, measured: RssAnon before and after closing every shard's Chroma client, less
  what closing the same clients freed when their shards were empty.

JSON, Markdown and a PNG (memory per part against memories) go to `--out-dir`.

`--serve` measures the whole engine instead: what `tellodb serve --config cluster.yaml` holds
before its first request, summed over every process it starts (router, Ray's GCS, raylet and
helpers, the placement authority, node actors, idle workers), by process kind:

    python loadtest/memory_profile.py --serve --label after

PSS (`/proc/PID/smaps_rollup`: shared pages split between the processes that map them; the sum
of RSS would count Ray's and Python's shared libraries once per process), RSS and the processes'
own (anonymous) memory, for a first start (which exports the model) and a later start. Each
`--label` (`--repo` serves another checkout, for a "before") is kept in
`<out-dir>/serve-memory-2core.json` and rendered side by side in its `.md`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from node.config import DEFAULT_MODEL, resolve_model_path  # noqa: E402
from node.index_budget import IndexBudget, index_bytes  # noqa: E402
from node.store import MemoryRecord, ShardStore, upsert_together  # noqa: E402
from node.vector_cache import VectorCache  # noqa: E402
from texts import query_text, sentence  # noqa: E402

MIB = 2**20
_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def sqlite_heap() -> int:
    """Bytes SQLite has allocated in this process (the library Python's sqlite3 module loaded)."""
    import _sqlite3

    lib = ctypes.CDLL(_sqlite3.__file__)  # resolves sqlite3_* through the module's own link
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib.sqlite3_memory_used()


def anon_mib() -> float:
    """This process's own memory after giving freed heap pages back."""
    gc.collect()
    _libc.malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def unit_vectors(rng: np.random.Generator, n: int, dimension: int) -> np.ndarray:
    v = rng.standard_normal((n, dimension)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--marks", default="10000,100000,1000000", help="memory counts to measure at")
    ap.add_argument("--shards", type=int, default=32, help="shards on the node (the default cluster: 64 on 2 nodes)")
    ap.add_argument("--per-entity", type=int, default=1000, help="memories per entity")
    ap.add_argument("--queries", type=int, default=300, help="queries at each mark")
    ap.add_argument("--vector-cache-mb", type=int, default=256)
    ap.add_argument("--data-dir", default=None, help="where the shards go (default: a temporary folder)")
    ap.add_argument("--out-dir", default="loadtest/results")
    ap.add_argument("--name", default="memory-profile-2core")
    ap.add_argument("--cold-only", action="store_true",
                    help="only measure cold shards' first queries, on the shards already in --data-dir")
    ap.add_argument("--serve", action="store_true", help="measure a whole `tellodb serve` before its first request")
    ap.add_argument("--label", default="after", help="--serve: the name this run is kept under (before, after, ...)")
    ap.add_argument("--repo", default=str(ROOT), help="--serve: the checkout to serve (default: this one)")
    ap.add_argument("--config", default=str(ROOT / "cluster.yaml"), help="--serve: the configuration")
    ap.add_argument("--settle", type=float, default=10.0, help="--serve: seconds between /ready and measuring")
    args = ap.parse_args()
    if args.serve:
        measure_serve(args)
        return
    marks = sorted(int(m) for m in args.marks.split(","))
    if args.cold_only:
        stores = [ShardStore(p, int(p.name), 384) for p in sorted(Path(args.data_dir, "shards").iterdir())]
        print(json.dumps(cold_queries(stores, np.random.default_rng(5), 384)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = {"python_and_imports": anon_mib()}
    from node.embedder import load_embedder

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="tdb-memprof-"))
    # Export the model in a child process first: the export imports torch, which a node whose
    # machine has the export never loads, and which would stay in this process's memory.
    subprocess.run([sys.executable, "-c", "import sys; from node.config import DEFAULT_MODEL, resolve_model_path; "
                    "from node.onnx_embedder import export_onnx; "
                    "export_onnx(resolve_model_path(DEFAULT_MODEL, sys.argv[1]), sys.argv[1], 'onnx')", str(data_dir)],
                   check=True, cwd=ROOT)
    embedder = load_embedder(resolve_model_path(DEFAULT_MODEL, str(data_dir)), "onnx", "cpu", 1, str(data_dir))
    embedder.encode(["warm up the session"])
    base["embedder"] = anon_mib() - base["python_and_imports"]
    dimension = embedder.dimension
    log(f"python {base['python_and_imports']:.0f} MiB, embedder +{base['embedder']:.0f} MiB")

    cache = VectorCache(args.vector_cache_mb * MIB)
    budget = IndexBudget(0)
    before_shards = anon_mib()
    stores = [ShardStore(data_dir / "shards" / f"{s:04d}", s, dimension, vector_cache=cache, index_budget=budget)
              for s in range(args.shards)]
    for store in stores:  # open every index (empty), as a node does at start-up
        store.reconcile()
    base["empty_shards"] = anon_mib() - before_shards
    for store in stores:
        store.index.unload()
    base["empty_clients_freed"] = base["empty_shards"] - (anon_mib() - before_shards)  # Chroma clients, no vectors
    log(f"{args.shards} empty shards +{base['empty_shards']:.0f} MiB")

    rng = np.random.default_rng(7)
    text_rng = random.Random(7)
    rows, done, write_seconds = [], 0, 0.0
    for mark in marks:
        started = time.perf_counter()
        while done < mark:
            n = min(4096, mark - done)
            vectors = unit_vectors(rng, n, dimension)
            by_shard: dict[int, list[MemoryRecord]] = {}
            for i in range(n):
                k = done + i
                entity, turn = divmod(k, args.per_entity)
                by_shard.setdefault(entity % args.shards, []).append(MemoryRecord(
                    f"m{entity}::s1::{turn}", f"m{entity}", "s1", turn, 1_700_000_000_000 + k, None,
                    sentence(text_rng, k), (), vectors[i]))
            upsert_together([(stores[s], batch) for s, batch in by_shard.items()])
            for s in by_shard:
                stores[s].index_pending()
            done += n
            if done % 50_000 < n:
                log(f"{done:,} memories ({done / (write_seconds + time.perf_counter() - started):.0f}/s)")
        write_seconds += time.perf_counter() - started
        entities = -(-mark // args.per_entity)
        q_rng = random.Random(mark)
        query_seconds = []
        for q in range(args.queries):
            vector = unit_vectors(rng, 1, dimension)[0]
            if q % 3 == 2:  # a whole shard's scope: through its HNSW index
                store, entity = stores[q_rng.randrange(args.shards)], None
            else:
                e = q_rng.randrange(entities)
                store, entity = stores[e % args.shards], f"m{e}"
            t = time.perf_counter()
            store.search(vector, query_text(q_rng), entity, 10)
            query_seconds.append(time.perf_counter() - t)
        total = anon_mib()
        sqlite_bytes = sqlite_heap()
        estimate = budget.bytes
        for store in stores:
            store.index.unload()
        unloaded = anon_mib()
        for store in stores:  # load them again: the next block writes to every shard
            store.index.collection.count()
        row = {
            "memories": mark,
            "anon_mib": round(total, 1),
            "chroma_loaded_mib": round(total - unloaded, 1),
            "hnsw_mib": round(total - unloaded - base["empty_clients_freed"], 1),
            "hnsw_estimate_mib": round(estimate / MIB, 1),
            "sqlite_heap_mib": round(sqlite_bytes / MIB, 1),
            "vector_cache_mib": round(cache.bytes / MIB, 1),
            "fixed_mib": round(base["python_and_imports"] + base["embedder"] + base["empty_shards"], 1),
            "query_p50_ms": round(float(np.percentile(query_seconds, 50)) * 1000, 2),
            "disk_mib": round(sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) / MIB, 1),
            "write_per_s": round(mark / write_seconds, 1),
        }
        row["other_mib"] = round(row["anon_mib"] - row["fixed_mib"] - row["hnsw_mib"] - row["sqlite_heap_mib"]
                                 - row["vector_cache_mib"], 1)
        row["per_memory_kib"] = round((row["anon_mib"] - row["fixed_mib"]) * 1024 / mark, 2)
        rows.append(row)
        log(json.dumps(row))

    cold = cold_queries(stores, rng, dimension)
    log(f"cold shards: {cold}")
    for store in stores:
        store.close()
    result = {"name": args.name, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "shards": args.shards, "per_entity": args.per_entity, "vector_cache_mb": args.vector_cache_mb,
              "dimension": dimension, "index_bytes_formula_1m": index_bytes(1_000_000 // args.shards, dimension) * args.shards,
              "fixed": {k: round(v, 1) for k, v in base.items()}, "marks": rows, "cold_shard": cold}
    write_reports(result, Path(args.out_dir))


def cold_queries(stores: list[ShardStore], rng: np.random.Generator, dimension: int) -> dict:
    """What a shard's first query costs once the index budget closed its index: each shard's whole
    scope (through HNSW) queried right after its index was unloaded, then again warm."""
    cold, warm = [], []
    for store in stores:
        store.index.unload()
        store.exact_scan = 0  # through HNSW even where the scope is small enough to scan exactly
        for times in (cold, warm):
            t = time.perf_counter()
            store.search(unit_vectors(rng, 1, dimension)[0], "cold shard", None, 10)
            times.append(time.perf_counter() - t)
    vectors = [store.index.vectors for store in stores]
    return {"vectors_per_shard": int(np.median(vectors)),
            "first_query_ms_p50": round(float(np.percentile(cold, 50)) * 1000, 1),
            "first_query_ms_max": round(max(cold) * 1000, 1),
            "warm_query_ms_p50": round(float(np.percentile(warm, 50)) * 1000, 2)}


def write_reports(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = result["name"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["memories", "anon_mib", "fixed_mib", "hnsw_mib", "hnsw_estimate_mib", "sqlite_heap_mib",
            "vector_cache_mib", "other_mib", "per_memory_kib", "query_p50_ms", "disk_mib"]
    lines = [f"# Memory profile of one node ({result['shards']} shards)", "",
             f"Fixed: Python and imports {result['fixed']['python_and_imports']} MiB, ONNX embedder "
             f"{result['fixed']['embedder']} MiB, {result['shards']} empty shards {result['fixed']['empty_shards']} MiB "
             f"(of which closing their Chroma clients frees {result['fixed']['empty_clients_freed']} MiB). "
             f"Vector cache cap {result['vector_cache_mb']} MiB. All figures are the process's own memory "
             "(RssAnon after malloc_trim); `hnsw_mib` is measured by closing every Chroma client, "
             "`per_memory_kib` is (anon - fixed) per memory.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |"
              for r in result["marks"]]
    c = result["cold_shard"]
    lines += ["", f"A cold shard's first query (its index closed by the budget, {c['vectors_per_shard']:,} vectors "
              f"per shard): p50 {c['first_query_ms_p50']} ms, max {c['first_query_ms_max']} ms, against "
              f"{c['warm_query_ms_p50']} ms warm.", "", f"![{name}.png]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["memories"] for r in result["marks"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("anon_mib", "process (RssAnon)"), ("hnsw_mib", "HNSW indexes"),
                       ("sqlite_heap_mib", "SQLite heap"), ("vector_cache_mib", "vector cache")]:
        ax.plot(xs, [r[key] for r in result["marks"]], marker="o", label=label)
    ax.set_xlabel("memories on the node")
    ax.set_ylabel("MiB")
    ax.set_title("Where one node's memory goes")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


# --serve: the whole engine before its first request ------------------------------------------

KINDS = (  # (kind, a piece of the process's command line); the first that matches names it
    ("ray_gcs", "gcs_server"), ("ray_raylet", "raylet/raylet"), ("ray_dashboard", "dashboard/dashboard.py"),
    ("ray_monitor", "autoscaler/_private/monitor.py"), ("ray_log_monitor", "log_monitor.py"),
    ("ray_dashboard_agent", "DashboardAgent"), ("ray_dashboard_agent", "dashboard/agent.py"),
    ("ray_runtime_env_agent", "RuntimeEnvAgent"), ("ray_runtime_env_agent", "runtime_env/agent/main.py"),
    ("ray_reaper", "ray_process_reaper"), ("placement_authority", "PlacementAuthority"),
    ("node_actor", "ExposedNode"), ("idle_worker", "ray::IDLE"), ("idle_worker", "default_worker.py"))


def process_kind(cmdline: str) -> str:
    return next((kind for kind, piece in KINDS if piece in cmdline), "other")


def proc_memory(pid: int) -> dict[str, float] | None:
    """PSS, RSS, and own (anonymous) memory of one process in MiB, from smaps_rollup."""
    try:
        fields = {}
        for line in open(f"/proc/{pid}/smaps_rollup"):
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) / 1024
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return {"pss_mib": fields.get("Pss", 0.0), "rss_mib": fields.get("Rss", 0.0),
            "anon_mib": fields.get("Anonymous", 0.0), "cmdline": cmdline}


def engine_pids(root: int) -> list[int]:
    """The engine's processes: `root`'s descendants, and any process naming the Ray session one of
    them runs (Ray could start a helper outside the tree), with its descendants."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
                cmdlines[int(entry)] = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))

    def tree(pids: list[int]) -> set[int]:
        found, todo = set(), list(pids)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    pids = tree([root])
    sessions = {part.split("/logs")[0] for pid in pids for part in cmdlines.get(pid, "").split("\0")
                if "/session_" in part and part.startswith(("--log_dir=", "--session-dir=", "--logs-dir="))}
    sessions = {s.split("=", 1)[1] for s in sessions}
    if sessions:
        pids |= tree([pid for pid, cmd in cmdlines.items() if any(s in cmd for s in sessions)])
    return sorted(pids)


def engine_memory(root: int) -> dict:
    """Every process of the engine with its kind and memory, and the sums by kind."""
    processes = []
    for pid in engine_pids(root):
        found = proc_memory(pid)
        if found is not None:
            kind = "router" if pid == root else process_kind(found["cmdline"])
            processes.append({"pid": pid, "kind": kind, **{k: round(v, 1) for k, v in found.items() if k != "cmdline"},
                              "cmdline": found["cmdline"][:120]})
    by_kind: dict[str, dict[str, float]] = {}
    for p in processes:
        into = by_kind.setdefault(p["kind"], {"count": 0, "pss_mib": 0.0, "rss_mib": 0.0, "anon_mib": 0.0})
        into["count"] += 1
        for key in ("pss_mib", "rss_mib", "anon_mib"):
            into[key] = round(into[key] + p[key], 1)
    totals = {key: round(sum(p[key] for p in processes), 1) for key in ("pss_mib", "rss_mib", "anon_mib")}
    return {**totals, "processes": len(processes), "by_kind": dict(sorted(by_kind.items())), "detail": processes}


def serve_once(args: argparse.Namespace, data_dir: str) -> dict:
    """Start `tellodb serve`, wait for /ready and `--settle` seconds, measure it, stop it."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=args.repo)
    for var in ("PORT", "TEMPORAL_MEMORY_PORT", "TEMPORAL_MEMORY_DATA_DIR", "TELLODB_DATA_DIR"):
        env.pop(var, None)
    exe = str(Path(sys.executable).parent / "tellodb")
    cmd = [exe, "serve", "--config", args.config, "--port", str(port), "--data-dir", data_dir]
    started = time.perf_counter()
    with open(Path(data_dir).parent / f"serve-{port}.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=args.repo, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"tellodb serve exited with {proc.returncode}: see {out.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - started
        time.sleep(args.settle)
        samples = []
        for _ in range(3):  # the median of three, a second apart
            samples.append(engine_memory(proc.pid))
            time.sleep(1)
        found = sorted(samples, key=lambda m: m["pss_mib"])[1]
        found["ready_seconds"] = round(ready, 1)
        log(f"serve: {found['pss_mib']:.0f} MiB PSS ({found['rss_mib']:.0f} RSS) in {found['processes']} processes, "
            f"ready after {ready:.1f} s")
        return found
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of its session, if anything
        except ProcessLookupError:
            pass


def measure_serve(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="tdb-servemem-"))
    data_dir = str(work / "data")
    commit = subprocess.run(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    run = {"commit": commit + ("+changes" if dirty else ""), "config": os.path.relpath(args.config, args.repo),
           "measured": time.strftime("%Y-%m-%d %H:%M"),
           "first_start": serve_once(args, data_dir), "later_start": serve_once(args, data_dir)}
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serve-memory-2core.json"
    result = json.loads(path.read_text()) if path.exists() else {
        "name": "serve-memory-2core", "goal_mib": 1000,
        "what": "memory of `tellodb serve` before its first request, summed over every process it starts"}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result.setdefault("runs", {})[args.label] = run
    path.write_text(json.dumps(result, indent=2) + "\n")
    write_serve_report(result, out / "serve-memory-2core.md")
    print(json.dumps({label: {start: r[start]["pss_mib"] for start in ("first_start", "later_start")}
                      for label, r in result["runs"].items()}))


def write_serve_report(result: dict, path: Path) -> None:
    runs = result["runs"]
    labels = list(runs)
    kinds = sorted({k for r in runs.values() for start in ("first_start", "later_start") for k in r[start]["by_kind"]},
                   key=lambda k: -max(r["later_start"]["by_kind"].get(k, {}).get("pss_mib", 0) for r in runs.values()))

    def cell(r: dict, kind: str) -> str:
        k = r["by_kind"].get(kind)
        return f"{k['pss_mib']:.0f} ({k['count']})" if k else "-"

    lines = [f"# `tellodb serve` before its first request ({result['machine']['cpus']} cores)", "",
             f"{result['what']}; goal: at most {result['goal_mib']} MiB. PSS in MiB (processes of the kind in "
             "parentheses), measured by `python loadtest/memory_profile.py --serve --label LABEL` "
             "on " + ", ".join(f"{label}: commit {runs[label]['commit']}" for label in labels) + ".", ""]
    for start, title in (("later_start", "A later start (the model exported already)"),
                         ("first_start", "The first start (exports the model)")):
        lines += [f"## {title}", "", "| process kind | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        lines += [f"| {kind} | " + " | ".join(cell(runs[label][start], kind) for label in labels) + " |" for kind in kinds]
        for key, name in (("pss_mib", "**total PSS**"), ("rss_mib", "total RSS (shared pages counted per process)"),
                          ("anon_mib", "total anonymous")):
            lines.append(f"| {name} | " + " | ".join(f"{runs[label][start][key]:,.0f}" for label in labels) + " |")
        lines.append("| ready after (s, a busy shared machine) | " + " | ".join(f"{runs[label][start]['ready_seconds']}" for label in labels)
                     + " |")
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
