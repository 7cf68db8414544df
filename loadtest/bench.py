"""A small benchmark of a tellodb engine: start-up time, ingest throughput, query latency.

    python loadtest/bench.py --spawn                      # start `tellodb serve` on a temp dir, measure, stop
    python loadtest/bench.py --url http://127.0.0.1:3000 --key XXX1111AAA

Prints progress to stderr and one JSON document to stdout (or `--out FILE`). Figures, not tests:
run it on a quiet machine and compare runs side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from texts import query_text, sentence  # noqa: E402

def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> object:
    async with session.post(url, json=body) as r:
        data = await r.json()
        if r.status not in (200, 201):  # 201: ingests
            raise RuntimeError(f"{url} -> {r.status}: {data}")
        return data


async def run_load(base: str, key: str, memories: int, concurrency: int, queries: int, batch: int) -> dict:
    rng = random.Random(7)
    headers = {"x-api-key": key}
    entities = [f"bench:{uuid.uuid4().hex[:8]}:{i}" for i in range(50)]
    results: dict = {"memories": memories, "concurrency": concurrency, "batch_size": batch}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=120)) as s:
        # Single ingests, `concurrency` clients in parallel.
        queue = list(range(memories))
        latencies: list[float] = []

        async def worker() -> None:
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                await post(s, f"{base}/ingest", {"entity_id": entities[i % len(entities)],
                                                 "textual_content": sentence(rng, i), "timestamp": 1_700_000_000_000 + i})
                latencies.append(time.perf_counter() - t)
                if len(latencies) % 500 == 0:
                    log(f"  single ingest {len(latencies)}/{memories}")

        log(f"single ingests: {memories} with {concurrency} clients")
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        results["single_ingest"] = {"per_second": round(memories / elapsed, 1),
                                    "p50_ms": round(percentile(latencies, 50) * 1000, 2),
                                    "p95_ms": round(percentile(latencies, 95) * 1000, 2)}

        # Batch ingests, 4 clients.
        total = memories
        batches = [[{"entity_id": entities[j % len(entities)], "textual_content": sentence(rng, memories + j)}
                     for j in range(k, min(k + batch, total))] for k in range(0, total, batch)]
        log(f"batch ingests: {total} in batches of {batch} with 4 clients")
        t0 = time.perf_counter()

        async def batch_worker() -> None:
            while batches:
                await post(s, f"{base}/ingest/batch", {"items": batches.pop()})

        await asyncio.gather(*(batch_worker() for _ in range(4)))
        results["batch_ingest"] = {"per_second": round(total / (time.perf_counter() - t0), 1)}

        # Queries, one client, sequential.
        log(f"queries: {queries}, one client")
        lat = []
        for q in range(queries):
            t = time.perf_counter()
            hits = await post(s, f"{base}/query/semantic", {"textual_query": query_text(rng),
                                                            "entity_id": entities[q % len(entities)], "limit": 10})
            lat.append(time.perf_counter() - t)
            assert isinstance(hits, list) and hits
        results["query_1_client"] = {"p50_ms": round(percentile(lat, 50) * 1000, 2),
                                     "p95_ms": round(percentile(lat, 95) * 1000, 2),
                                     "p99_ms": round(percentile(lat, 99) * 1000, 2),
                                     "mean_ms": round(statistics.mean(lat) * 1000, 2)}

        # Queries, `concurrency` clients.
        remaining = list(range(queries))
        lat = []

        async def query_worker() -> None:
            while remaining:
                q = remaining.pop()
                t = time.perf_counter()
                await post(s, f"{base}/query/semantic", {"textual_query": query_text(rng),
                                                         "entity_id": entities[q % len(entities)], "limit": 10})
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(query_worker() for _ in range(concurrency)))
        results[f"query_{concurrency}_clients"] = {"per_second": round(queries / (time.perf_counter() - t0), 1),
                                                   "p50_ms": round(percentile(lat, 50) * 1000, 2),
                                                   "p99_ms": round(percentile(lat, 99) * 1000, 2)}
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_engine_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark shares: which engine to measure."""
    ap.add_argument("--url", default="http://127.0.0.1:3000", help="a running engine (ignored with --spawn)")
    ap.add_argument("--key", default=os.environ.get("TELLODB_API_KEY", "XXX1111AAA"))
    ap.add_argument("--spawn", action="store_true", help="start `tellodb serve` on a temporary data dir")
    ap.add_argument("--backend", help="embedding backend of the spawned engine (torch, onnx, onnx-w8, onnx-int8; default: the engine's, onnx-w8)")
    ap.add_argument("--out", help="write the JSON here as well as to stdout")


class Engine:
    """The engine a benchmark measures: the one at `--url`, or with `--spawn` a `tellodb serve` of
    its own on a free port and a temporary data directory, stopped and removed on exit."""

    def __init__(self, args: argparse.Namespace, data_dir: str | None = None, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.base = args.url
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = data_dir  # a data directory made for the run (removed on exit), or a new one
        self.env = env or {}  # more of the spawned engine's environment
        self.startup_seconds: float | None = None

    def __enter__(self) -> "Engine":
        if not self.args.spawn:
            return self
        import urllib.request

        self.tmp = self.tmp or tempfile.mkdtemp(prefix="tellodb-bench-")
        port = free_port()
        env = dict(os.environ, TEMPORAL_MEMORY_PORT=str(port), TEMPORAL_MEMORY_DATA_DIR=self.tmp,
                   TEMPORAL_MEMORY_API_KEY=self.args.key, TEMPORAL_MEMORY_HOST="127.0.0.1", HF_HUB_OFFLINE="1",
                   **self.env)
        if self.args.backend:
            env["TEMPORAL_MEMORY_EMBEDDING_BACKEND"] = self.args.backend
        env.pop("PORT", None)
        exe = shutil.which("tellodb") or str(Path(sys.executable).parent / "tellodb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([exe, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"tellodb serve exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        self.startup_seconds = round(time.perf_counter() - t0, 2)
        log(f"engine healthy after {self.startup_seconds} s")
        return self

    def stop(self) -> dict:
        """SIGTERM a spawned engine; its exit code and how long the graceful stop took."""
        if self.proc is None:
            return {}
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        return {"shutdown_exit_code": code, "shutdown_seconds": round(time.perf_counter() - t0, 2)}

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(ap)
    ap.add_argument("--memories", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()}, "backend": args.backend or "default"}
    with Engine(args) as engine:
        if engine.startup_seconds is not None:
            report["startup_seconds"] = engine.startup_seconds
        report.update(asyncio.run(run_load(engine.base, args.key, args.memories, args.concurrency, args.queries,
                                           args.batch)))
        report.update(engine.stop())
    emit(report, args.out)


if __name__ == "__main__":
    main()
