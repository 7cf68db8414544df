"""Where a single query's time goes, hop by hop: HTTP, auth, validation, the router, the Ray call,
the node's loop, the embedding thread, the store thread, dense and lexical candidates, fusion,
hydration, and back.

    python loadtest/hops.py                                  # this tree only
    python loadtest/hops.py --baseline main --out loadtest/results/hops-2core.json

Starts `tellodb serve` (default configuration) on a temporary data directory, stores `--memories`
memories over `--entities` entities, lets the indexer settle, then sends `--queries` queries one at
a time (one client, keep-alive HTTP, like an agent's turn) per scope: an entity's memories
(`entity`, the common case: one shard, the exact scan of its cached vectors) and every entity
(`all`: a fan-out to every node, each searching its shards one after another: an exact scan of a
shard's vectors from SQLite, Chroma's HNSW once a shard's scope passes 2,000 memories).

Each tree's engine is started `--rounds` times plain (the client's latency, nothing added) and as
often marked: a `sitecustomize` on the engine's PYTHONPATH (loadtest/hops_marks.py) wraps the
functions each hop starts and ends in (router and node processes alike, nothing in the engine's
code) and each process appends `name time.perf_counter()` lines to a file; CLOCK_MONOTONIC is one
clock for every process of the machine, so a query's marks from the router and the node line up
on one time line. The marks cost
a few microseconds each (about 60 per query): compare the plain and marked totals.

With `--baseline REF` the tree at git REF (`git archive`) runs beside this one, each engine on its
own copy of the data, every query sent to both in turn (the order alternating), so a busy machine
slows both alike; each hop's p50 is compared (ratio after/before). Progress goes to stderr, one
JSON document to stdout or `--out` (and Markdown beside it, or at `--md`).
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEY = "hops-key-0123456789"

SITECUSTOMIZE = f"""import os
if os.environ.get("TELLODB_HOPS_DIR"):
    import importlib.util
    _spec = importlib.util.spec_from_file_location("tellodb_hops", {str(HERE / "hops_marks.py")!r})
    _hops = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_hops)
    _hops.install_marks()
"""

# ---- the hops: (label, kind, a, b); "gap": from mark a to mark b; "sum": the spans named a --------

HOPS = [
    ("client -> router (send, loopback)", "gap", "c.send", "r.http.b"),
    ("HTTP parse, dispatch", "gap", "r.http.b", "r.mw.b"),
    ("middlewares (metrics, errors)", "gap", "r.mw.b", "r.access.b"),
    ("auth (key, role, rate)", "gap", "r.access.b", "r.handler.b"),
    ("body read + JSON", "sum", "r.read_json", None),
    ("validation (pydantic)", "sum", "r.parse", None),
    ("scope, handler -> cluster", "gap", "r.parse.e", "r.cluster.b"),
    ("router: routing, coalescer", "gap", "r.cluster.b", "r.submit.b"),
    ("Ray submit (serialize, send)", "sum", "r.submit", None),
    ("Ray -> node event loop", "gap", "r.submit.e", "n.many.b"),
    ("node: many -> query -> embed", "gap", "n.many.b", "n.embed.b"),
    ("node loop -> embed thread", "gap", "n.embed.b", "n.encode.b"),
    ("embedding (model)", "sum", "n.encode", None),
    ("embed thread -> node loop", "gap", "n.encode.e", "n.embed.e"),
    ("node loop -> store thread", "gap", "n.embed.e", "n.search.b"),
    ("scope count", "gap", "n.search.b", "n.dense.b"),
    ("ANN: dense candidates", "sum", "n.dense", None),
    ("  of which HNSW (Chroma)", "sum", "n.hnsw", None),
    ("FTS: BM25 (two tables)", "sum", "n.bm25", None),
    ("fact slot mates", "sum", "n.slots", None),
    ("fusion: score candidates", "gap", "n.score.b", "n.validity.b"),
    ("fact validity", "sum", "n.validity", None),
    ("hydration: best rows", "gap", "n.validity.e", "n.score.e"),
    ("store thread -> node loop", "gap", "n.search.e", "n.query.e"),
    ("node: query -> many -> Ray", "gap", "n.query.e", "n.many.e"),
    ("Ray -> router (answer)", "gap", "n.many.e", "r.call.e"),
    ("router: back to the handler", "gap", "r.call.e", "r.cluster.e"),
    ("response: hits, JSON", "gap", "r.cluster.e", "r.handler.e"),
    ("response: middlewares, write", "gap", "r.handler.e", "r.write.e"),
    ("router -> client (loopback, parse)", "gap", "r.write.e", "c.recv"),
]
NESTED = {"  of which HNSW (Chroma)"}  # inside the row before it: not added to the sum


def hop_times(marks: list[tuple[float, str, int]]) -> dict[str, float | None]:
    """Each hop's milliseconds in one query's marks (time-sorted; (time, name, pid), the client's
    pid 0). A "gap" pairs each `a` with the next `b` (a later `a` replaces a waiting one). Hops
    inside a node add up per node process, then average over the nodes (a fan-out's shards run
    one after another on each node's store thread); other gaps average over their pairs (one, for
    an entity's query)."""
    nodes = {pid for _, name, pid in marks if name == "n.many.b"} or {None}
    out: dict[str, float | None] = {}
    for label, kind, a, b in HOPS:
        inside = a.startswith("n.") and (kind == "sum" or b.startswith("n."))
        per: dict[int | None, list[float]] = {}
        if kind == "sum":
            opened: dict[int, list[float]] = {}
            for t, name, pid in marks:
                if name == a + ".b":
                    opened.setdefault(pid, []).append(t)
                elif name == a + ".e" and opened.get(pid):
                    per.setdefault(pid if inside else None, []).append(t - opened[pid].pop())
        else:
            waiting: dict[int | None, float] = {}
            for t, name, pid in marks:
                key = pid if inside else None
                if name == a:
                    waiting[key] = t
                elif name == b and key in waiting:
                    per.setdefault(key, []).append(t - waiting.pop(key))
        if not per:
            out[label] = None
        elif inside:
            out[label] = sum(sum(per.get(pid, [])) for pid in nodes) / len(nodes) * 1000
        elif kind == "sum":
            out[label] = sum(per[None]) * 1000
        else:
            out[label] = sum(per[None]) / len(per[None]) * 1000
    return out


# ---- the driver ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Engine:
    """`tellodb serve` from `tree`'s code on `data_dir`; with `marks_dir`, marked."""

    def __init__(self, tree: Path, data_dir: Path, site: Path, marks_dir: Path | None, backend: str | None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
        env.update(TEMPORAL_MEMORY_PORT=str(self.port), TEMPORAL_MEMORY_DATA_DIR=str(data_dir),
                   TEMPORAL_MEMORY_API_KEY=KEY, TEMPORAL_MEMORY_HOST="127.0.0.1", HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(site), str(tree)]))
        env.pop("PORT", None)
        if backend:
            env["TEMPORAL_MEMORY_EMBEDDING_BACKEND"] = backend
        if marks_dir is not None:
            env["TELLODB_HOPS_DIR"] = str(marks_dir)
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        code = "import sys; from router.cli import main; sys.argv = ['tellodb', 'serve']; sys.exit(main())"
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=open(self.log_path, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=str(data_dir.parent))

    def wait(self) -> Engine:
        """Until it answers /health."""
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"tellodb serve exited with {self.proc.returncode}: {self.log_path}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1).read()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"tellodb serve did not start: {self.log_path}")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of its process group (Ray)
        except ProcessLookupError:
            pass


class Client:
    """One keep-alive HTTP connection, one request at a time."""

    def __init__(self, base: str) -> None:
        host, port = base.rsplit("/", 1)[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.headers = {"x-api-key": KEY, "content-type": "application/json"}

    def post(self, path: str, body: dict) -> tuple[float, float, object]:
        data = json.dumps(body).encode()
        sent = time.perf_counter()
        self.conn.request("POST", path, data, self.headers)
        r = self.conn.getresponse()
        answer = json.loads(r.read())
        received = time.perf_counter()
        if not 200 <= r.status < 300:  # /ingest/batch answers 201, as upstream
            raise SystemExit(f"{path} -> {r.status}: {answer}")
        return sent, received, answer

    def get(self, path: str) -> object:
        self.conn.request("GET", path, headers=self.headers)
        r = self.conn.getresponse()
        return json.loads(r.read())


def preload(base: str, entities: list[str], memories: int, rng: random.Random) -> None:
    sys.path.insert(0, str(HERE))
    from texts import sentence

    client = Client(base)
    t0 = time.perf_counter()
    for k in range(0, memories, 256):
        items = [{"entity_id": entities[j % len(entities)], "textual_content": sentence(rng, j),
                  "timestamp": 1_700_000_000_000 + j * 1000} for j in range(k, min(k + 256, memories))]
        client.post("/ingest/batch", {"items": items})
    log(f"  stored {memories} memories in {time.perf_counter() - t0:.0f} s")
    while client.get("/stats").get("unindexed", 0):
        time.sleep(1)
    log(f"  indexed after {time.perf_counter() - t0:.0f} s")


def queries(entities: list[str], n: int, scope: str, seed: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from texts import query_text

    rng = random.Random(seed)
    return [{"textual_query": query_text(rng), "limit": 10} | ({"entity_id": rng.choice(entities)} if scope == "entity"
                                                              else {}) for _ in range(n)]


def read_marks(marks_dir: Path) -> list[tuple[float, str, int]]:
    found = []
    for path in marks_dir.glob("*.marks"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            name, t = line.split(" ")
            found.append((float(t), name, pid))
    found.sort()
    return found


def run_together(trees: dict[str, Path], datas: dict[str, Path], site: Path, marks: dict[str, Path] | None,
                 args, entities: list[str]) -> dict[str, dict]:
    """One start of each tree's engine, side by side (each on its own copy of the data): warm up,
    then each scope's queries, each query sent to every engine in turn (the order alternating),
    so a busy machine slows them alike. Per tree and scope: the client's latencies and (marked)
    each query's hops."""
    engines = {name: Engine(tree, datas[name], site, marks[name] if marks else None, args.backend)
               for name, tree in trees.items()}
    windows: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in trees}
    try:
        clients = {name: Client(engine.wait().base) for name, engine in engines.items()}
        for body in queries(entities, args.warmup, "entity", 1) + queries(entities, args.warmup // 4, "all", 2):
            for client in clients.values():
                client.post("/query", body)
        time.sleep(1)  # the indexer's search gap (node.tuning) passes; nothing else runs
        names = list(trees)
        for scope in args.scopes:
            for i, body in enumerate(queries(entities, args.queries, scope, 3)):
                for name in (names if i % 2 == 0 else names[::-1]):
                    sent, received, _ = clients[name].post("/query", body)
                    windows[name].setdefault(scope, []).append((sent, received))
    finally:
        for engine in engines.values():
            engine.stop()
    results: dict[str, dict] = {}
    for name in trees:
        found = read_marks(marks[name]) if marks else []
        times = [m[0] for m in found]
        results[name] = {"marked": bool(marks)}
        for scope, spans in windows[name].items():
            entry: dict = {"total_ms": [(r - s) * 1000 for s, r in spans]}
            if marks:
                entry["hops"] = [hop_times([(s, "c.send", 0), *found[bisect.bisect_left(times, s):
                                                                     bisect.bisect_right(times, r)],
                                            (r, "c.recv", 0)]) for s, r in spans]
            results[name][scope] = entry
    return results


def p50(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 3) if found else None


def summarize(runs: list[dict], scopes: list[str]) -> dict:
    """Per scope: p50 of the plain totals, of the marked totals, and of each hop over every query
    of the runs given (one tree)."""
    out = {}
    for scope in scopes:
        plain = [t for r in runs if not r["marked"] for t in r[scope]["total_ms"]]
        marked = [t for r in runs if r["marked"] for t in r[scope]["total_ms"]]
        hops = [h for r in runs if r["marked"] for h in r[scope]["hops"]]
        ordered = sorted(plain)
        out[scope] = {
            "queries": len(plain),
            "total_p50_ms": p50(plain),
            "total_p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 3) if ordered else None,
            "marked_total_p50_ms": p50(marked),
            "hops_p50_ms": {label: p50([h[label] for h in hops]) for label, *_ in HOPS},
        }
        listed = [v for k, v in out[scope]["hops_p50_ms"].items() if v is not None and k not in NESTED]
        out[scope]["sum_of_hop_p50s_ms"] = round(sum(listed), 3)
    return out


def markdown(report: dict) -> str:
    trees = list(report["trees"])
    lines = [f"# Hot path: where a query's time goes ({report['machine']['cpus']} cores)", "",
             f"`{report['command']}`", "",
             f"{report['memories']} memories over {report['entities']} entities; {report['queries']} queries "
             f"per scope and start, one client, keep-alive HTTP; p50 in ms. Plain: no marks in the engine; "
             f"marked: the hop marks on (their cost is the difference). Scope `all`: a hop inside a node adds up "
             f"its shards and averages over the nodes; a blank cell: that hop did not occur.", ""]
    for scope in report["scopes"]:
        lines += [f"## Scope: {scope}", ""]
        header = "| hop | " + " | ".join(trees) + (" | after/before |" if len(trees) == 2 else " |")
        lines += [header, "|---|" + "---:|" * (len(trees) + (1 if len(trees) == 2 else 0))]
        rows = [("**total, plain**", "total_p50_ms"), ("total p90, plain", "total_p90_ms"),
                ("total, marked", "marked_total_p50_ms"), ("sum of the hops' p50", "sum_of_hop_p50s_ms")]
        values = [[report["trees"][t][scope][key] for t in trees] for _, key in rows]
        labels = [label for label, _ in rows]
        for label, *_ in HOPS:
            labels.append(label)
            values.append([report["trees"][t][scope]["hops_p50_ms"][label] for t in trees])
        for label, vals in zip(labels, values):
            cells = ["" if v is None else f"{v:.3f}" for v in vals]
            if len(trees) == 2:
                a, b = vals
                cells.append(f"{b / a:.2f}" if a and b is not None and a > 0.005 else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", type=int, default=3000)
    ap.add_argument("--entities", type=int, default=20)
    ap.add_argument("--queries", type=int, default=200, help="per scope and start of the engine")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--scopes", default="entity,all")
    ap.add_argument("--rounds", type=int, default=2, help="plain and marked starts per tree")
    ap.add_argument("--baseline", help="a git ref to compare with (before), e.g. main")
    ap.add_argument("--backend", help="embedding backend (default: the engine's)")
    ap.add_argument("--out")
    ap.add_argument("--md", help="Markdown report (default: --out with .md)")
    args = ap.parse_args()
    args.scopes = args.scopes.split(",")

    repo = HERE.parent
    work = Path(tempfile.mkdtemp(prefix="tellodb-hops-"))
    try:
        site = work / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        trees = {"this tree": repo}
        if args.baseline:
            before = work / "before"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(repo), "archive", args.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
            trees = {"before": before, "after": repo}
        data = work / "data"
        data.mkdir()
        entities = [f"hops:{i}" for i in range(args.entities)]
        log(f"preloading {args.memories} memories (tree: {repo})")
        engine = Engine(repo, data, site, None, args.backend)
        try:
            preload(engine.wait().base, entities, args.memories, random.Random(5))
        finally:
            engine.stop()
        datas = {}
        for name in trees:
            datas[name] = work / f"data-{name}" / "data"
            shutil.copytree(data, datas[name], ignore=shutil.ignore_patterns("*.lock", "ray_auth_token"))
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for marked in (False, True):
                log(f"round {r + 1}/{args.rounds}: {' and '.join(trees)}, {'marked' if marked else 'plain'}")
                marks = None
                if marked:
                    marks = {name: work / f"marks-{name}-{r}" for name in trees}
                    for path in marks.values():
                        path.mkdir()
                for name, run in run_together(trees, datas, site, marks, args, entities).items():
                    runs[name].append(run)
                    log(f"  {name}: " + ", ".join(f"{scope} p50 {p50(run[scope]['total_ms']):.2f} ms"
                                                  for scope in args.scopes))
        report = {
            "command": "python loadtest/hops.py " + " ".join(sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "memories": args.memories, "entities": args.entities, "queries": args.queries, "rounds": args.rounds,
            "scopes": args.scopes, "baseline": args.baseline,
            "trees": {name: summarize(rs, args.scopes) for name, rs in runs.items()},
        }
        if args.baseline:
            report["after_over_before"] = {
                scope: {"total_p50": round(report["trees"]["after"][scope]["total_p50_ms"]
                                           / report["trees"]["before"][scope]["total_p50_ms"], 3)}
                for scope in args.scopes}
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
            Path(args.md or Path(args.out).with_suffix(".md")).write_text(markdown(report))
        elif args.md:
            Path(args.md).write_text(markdown(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
