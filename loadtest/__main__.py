"""`python -m loadtest`: run a named load scenario against an engine and write reports.

    python -m loadtest --spawn --scenario mixed --duration 60 --concurrency 16
    python -m loadtest --url http://10.0.0.5:3000 --key KEY --scenario agent-loop --duration 300

Progress goes to stderr every 5 s; JSON, Markdown and PNG reports go to `--out-dir`
(default loadtest/results/). The raw embedder limit is measured first, in this process, so every
throughput is also given as a ratio to what the machine's embedder can do (`--no-limit` skips it,
for example when the engine runs elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Engine, add_engine_arguments, log  # noqa: E402
from harness import SCENARIOS, embedder_limit, run, summarise  # noqa: E402
from report import ratios, write  # noqa: E402


async def run_baseline(args: argparse.Namespace):
    """Start the hand-rolled baseline on a free port and a temporary directory, run the same scenario."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import urllib.request

    from bench import free_port

    port, tmp = free_port(), tempfile.mkdtemp(prefix="tellodb-baseline-")
    script = Path(__file__).resolve().parent / "baseline_chroma.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--data", tmp, "--key", args.key,
                             "--backend", args.baseline_backend], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"baseline exited with {proc.returncode}")
            try:
                urllib.request.urlopen(base + "/health", timeout=1).read()
                break
            except OSError:
                await asyncio.sleep(0.3)
        log(f"baseline (single-process Chroma) healthy at {base}")
        return await run(base, args.key, args.scenario, args.duration, args.concurrency, args.batch, args.entities,
                         args.preload, proc.pid, args.warmup, args.tag)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def compare(engine: dict, baseline: dict) -> dict:
    """Per operation: engine throughput / baseline throughput, engine p50 and p99 / baseline's."""
    out = {}
    for op, e in engine["operations"].items():
        b = baseline["operations"].get(op)
        if b and b["items_per_second"] and b["latency_ms"]["p99"]:
            out[op] = {"throughput_ratio": round(e["items_per_second"] / b["items_per_second"], 2),
                       "p50_ratio": round(e["latency_ms"]["p50"] / b["latency_ms"]["p50"], 2),
                       "p99_ratio": round(e["latency_ms"]["p99"] / b["latency_ms"]["p99"], 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(ap)
    ap.add_argument("--scenario", choices=SCENARIOS, default="mixed")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--concurrency", type=int, default=16, help="clients")
    ap.add_argument("--batch", type=int, default=64, help="memories per /ingest/batch (bulk-import)")
    ap.add_argument("--entities", type=int, default=100)
    ap.add_argument("--preload", type=int, default=2000, help="memories stored before the timed run")
    ap.add_argument("--tag", help="entity name prefix (default: new per run); reuse one to query an earlier preload")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before recording starts")
    ap.add_argument("--no-limit", action="store_true", help="do not measure the raw embedder limit")
    ap.add_argument("--limit-backend", help="the raw limit's backend (default: the engine's); torch is issue 22's "
                    "yardstick for batch ingest")
    ap.add_argument("--baseline", action="store_true",
                    help="also run the scenario against a single-process Chroma service "
                         "(loadtest/baseline_chroma.py) and report the ratios")
    ap.add_argument("--baseline-backend", default="torch",
                    help="the baseline's embedder, all cores: torch (sentence-transformers, issue 22's hand-rolled "
                         "peer; the default) or an ONNX backend (onnx: fp32 ONNX Runtime, a faster peer)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--name", help="report file name (default: <scenario>-<timestamp>)")
    args = ap.parse_args()

    from node.config import EmbeddingConfig

    limit = None
    if not args.no_limit:
        log("measuring the raw embedder limit of this machine")
        limit = embedder_limit(args.limit_backend or args.backend or EmbeddingConfig().backend)
        log(f"  {limit['batch32_per_second']} texts/s in batches of 32, single p50 {limit['single_p50_ms']} ms")
    with Engine(args) as engine:
        result = asyncio.run(run(engine.base, args.key, args.scenario, args.duration, args.concurrency, args.batch,
                                 args.entities, args.preload, engine.proc.pid if engine.proc else None,
                                 args.warmup, args.tag))
        stopped = engine.stop()
    summary = summarise(result)
    baseline = None
    if args.baseline:
        baseline = summarise(asyncio.run(run_baseline(args)))
    report = {"target": engine.base, "backend": args.backend or "default", "startup_seconds": engine.startup_seconds,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "embedder_limit": limit, "summary": summary, "ratios_to_limit": ratios(summary, limit), **stopped}
    if baseline is not None:
        report["baseline"] = {"what": f"one process, one Chroma collection, embedder {args.baseline_backend} "
                                      f"on all cores, no batching", "backend": args.baseline_backend,
                              "summary": baseline, "ratios_to_limit": ratios(baseline, limit),
                              "engine_over_baseline": compare(summary, baseline)}
    name = args.name or f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in write(report, Path(args.out_dir), name):
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
