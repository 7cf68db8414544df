"""Time to heal after a head outage, with and without GCS fault tolerance (Redis).

A multi-machine-shaped cluster on this machine (loadtest.local_cluster: a head, three `tellodb
node`s, two routers, `replication: 2`, 8 shards) under mixed load through both routers
(loadtest.mixed_load). Every process of the head is killed (SIGKILL, a lost machine) for
`--outage` seconds and started again on the same data directory, `--runs` times per mode:

- `no-redis`: Ray's GCS starts empty, a new Ray cluster; nodes and routers rejoin it by themselves;
- `redis`: the GCS keeps its tables in a local `redis-server` (password set); the same cluster
  comes back;
- `empty-disk`: no Redis, and the head's data directory is deleted while it is away: it starts
  on an empty one with a copy of the cluster's token and rebuilds the placement from the nodes.

Measured from the head's return (its `Head ready` line): `served_s`, until every shard answers a
read again for good (a probe per shard, through a router, every 0.25 s; the end of the last gap
longer than 1 s); `healed_s`, until `tellodb cluster status` shows every shard with its two copies
live at the same seq; the longest gap between two answered probes of one shard; the load's client
errors (by status) and, at the end of each mode, how many acknowledged writes read back.

    python loadtest/head_outage.py --tag 2core            # 2 runs without Redis, 5 with
    python loadtest/head_outage.py --tag 2core-empty-disk --runs-no-redis 0 --runs-redis 0 --runs-empty-disk 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tellodb import TellodbClient  # noqa: E402

from loadtest.local_cluster import LocalCluster, free_port  # noqa: E402
from loadtest.mixed_load import MixedLoad  # noqa: E402
from node.ids import shard_of  # noqa: E402

KEY = "bench-key-0123456789"
RESULTS = Path(__file__).resolve().parent / "results"
SHARDS = 8


def entity_on(shard: int) -> str:
    n = 0
    while shard_of(f"probe:user-{n}", SHARDS) != shard:
        n += 1
    return f"probe:user-{n}"


class Prober:
    """One read per shard, round after round, through alternating routers; the time each answered."""

    def __init__(self, urls: list[str]) -> None:
        self.clients = [TellodbClient.from_cloud(base_url=u, api_key=KEY, timeout=60) for u in urls]
        self.answered: dict[int, list[float]] = {s: [] for s in range(SHARDS)}
        self.failed: dict[int, list[float]] = {s: [] for s in range(SHARDS)}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in range(SHARDS)]

    def start(self) -> Prober:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def _run(self, shard: int) -> None:
        entity, i = entity_on(shard), 0
        while not self._stop.is_set():
            try:
                self.clients[i % len(self.clients)].query("tea", entity_id=entity, top_k=1)
                self.answered[shard].append(time.monotonic())
            except Exception as exc:
                self.failed[shard].append(time.monotonic())
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            i += 1
            self._stop.wait(0.25)

    def since(self, t0: float) -> tuple[float, float]:
        """(served_s: end of the last gap over 1 s after t0, longest gap of one shard) in seconds."""
        served, longest = 0.0, 0.0
        for shard in range(SHARDS):
            times = [t0] + [t for t in self.answered[shard] if t > t0]
            for a, b in zip(times, times[1:]):
                longest = max(longest, b - a)
                if b - a > 1.0:
                    served = max(served, b - t0)
        return round(served, 2), round(longest, 2)


def healed(c: LocalCluster, url: str, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        done = c.cli("cluster", "status", "--json", "--url", url, "--key", KEY)
        if done.returncode == 0:
            s = json.loads(done.stdout)
            if (not s["under_replicated"] and not s["down"] and not s.get("rejoining")
                    and all(len({cp["seq"] or 0 for cp in d["copies"]}) == 1 and all(cp["live"] for cp in d["copies"])
                            for d in s["shards_detail"])):
                return time.monotonic()
        time.sleep(0.25)
    raise RuntimeError("not healed")


def start_redis(folder: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port, password = free_port(), "bench-redis-password-5c1e"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                             "--save", "", "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, {"RAY_REDIS_ADDRESS": f"127.0.0.1:{port}", "RAY_REDIS_PASSWORD": password,
                  "RAY_external_storage_namespace": "tellodb-bench"}


def model_seed(root: Path) -> Path:
    """The ONNX export once, copied into every node (loadtest.local_cluster)."""
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.onnx_embedder import export_onnx

    seed = root / "model-seed"
    export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), "onnx")
    return seed


def run_mode(mode: str, runs: int, outage: float, root: Path, seed: Path) -> dict:
    redis, head_env = (None, None)
    if mode == "redis":
        redis, head_env = start_redis(root)
    c = LocalCluster(root / mode, KEY, shards=SHARDS, nodes=("n1", "n2", "n3"), model_seed=seed,
                     extra_config={"replication": 2, "failover_after_s": 2})
    rows = []
    token = root / f"{mode}-token"
    try:
        c.start_head(env=head_env)
        if mode == "empty-disk":  # nodes and routers hold a copy of the token, as on other machines
            shutil.copy(c.root / "head" / "ray_auth_token", token)
            c.env["TELLODB_RAY_TOKEN_FILE"] = str(token)
        c.start_nodes(["n1", "n2", "n3"])
        r1, r2 = c.start_routers(2)
        healed(c, r1.url)
        load = MixedLoad([r1.url, r2.url], KEY, entities=12).start()
        probe = Prober([r1.url, r2.url]).start()
        time.sleep(5)
        for run in range(1, runs + 1):
            errors_before = len(load.errors)
            c.kill("head")
            if mode == "empty-disk":
                shutil.rmtree(c.root / "head")
            time.sleep(outage)
            c.start_head(env=head_env, args=("--ray-token-file", str(token)) if mode == "empty-disk" else ())
            back = time.monotonic()
            done = healed(c, r1.url)
            time.sleep(3)
            served_s, gap = probe.since(back)
            errors = load.errors[errors_before:]
            row = {"mode": mode, "run": run, "outage_s": outage, "served_s": served_s, "healed_s": round(done - back, 2),
                   "longest_shard_gap_s": gap, "client_errors": len(errors),
                   "errors_500": sum("HTTP 500" in e[2] for e in errors),
                   "probe_failures": sum(1 for s in probe.failed.values() for t in s if t > back - outage - 1),
                   "error_samples": sorted({e[2][:160] for e in errors} | set(probe.errors[-3:]))[:5]}
            print(json.dumps(row), flush=True)
            rows.append(row)
        probe.stop()
        load.stop()
        client = TellodbClient.from_cloud(base_url=r2.url, api_key=KEY, timeout=60)
        lost = sum(1 for m, (_, text) in load.acked.items() if (client.inspect_memory(m) or {}).get("textual_content") != text)
        return {"mode": mode, "runs": rows, "acked_writes": len(load.acked), "lost_writes": lost,
                "writes": load.count("write"), "reads": load.count("read")}
    finally:
        c.close()
        if redis is not None:
            redis.send_signal(signal.SIGKILL)
            redis.wait(timeout=10)


def markdown(result: dict) -> str:
    lines = [f"# Head outage: time to heal ({result['tag']})", "",
             f"{result['outage_s']:g} s head outages (SIGKILL of every head process, restart on the same data "
             "directory; in the empty-disk mode on an empty one), a head, 3 nodes, 2 routers, replication 2, 8 "
             "shards, mixed load through both routers; probes: one read per shard every 0.25 s. "
             "`served_s`: head back until every shard answers reads again for good; `healed_s`: until every "
             "shard has both copies live at the same seq. Command: `python loadtest/head_outage.py`.", "",
             "| mode | run | served_s | healed_s | longest shard gap s | load's client errors | of them 500 "
             "| probe errors |", "|---|---|---|---|---|---|---|---|"]
    for mode in result["modes"]:
        for r in mode["runs"]:
            lines.append(f"| {r['mode']} | {r['run']} | {r['served_s']} | {r['healed_s']} | {r['longest_shard_gap_s']} "
                         f"| {r['client_errors']} | {r['errors_500']} | {r['probe_failures']} |")
    samples = sorted({e for mode in result["modes"] for r in mode["runs"] for e in r.get("error_samples", ())})
    if samples:
        lines += ["", "Errors seen: " + "; ".join(f"`{e}`" for e in samples[:5])]
    lines += ["", "| mode | acknowledged writes | lost | writes | reads |", "|---|---|---|---|---|"]
    for mode in result["modes"]:
        lines.append(f"| {mode['mode']} | {mode['acked_writes']} | {mode['lost_writes']} | {mode['writes']} | "
                     f"{mode['reads']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, default=60)
    ap.add_argument("--runs-no-redis", type=int, default=2)
    ap.add_argument("--runs-redis", type=int, default=5)
    ap.add_argument("--runs-empty-disk", type=int, default=0)
    ap.add_argument("--tag", default="local")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="head-outage-"))
    modes = []
    try:
        seed = model_seed(root)
        if args.runs_no_redis:
            modes.append(run_mode("no-redis", args.runs_no_redis, args.outage, root, seed))
        if args.runs_redis:
            if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
                print("no redis-server: the redis mode is skipped (make ops-deps installs it)")
            else:
                modes.append(run_mode("redis", args.runs_redis, args.outage, root, seed))
        if args.runs_empty_disk:
            modes.append(run_mode("empty-disk", args.runs_empty_disk, args.outage, root, seed))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"tag": args.tag, "outage_s": args.outage, "modes": modes, "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"head-outage-{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"head-outage-{args.tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
