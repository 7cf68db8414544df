"""What a query vector costs a Ray actor call, as an ndarray and as its bytes.

    python loadtest/ray_arguments.py --out loadtest/results/ray-arguments-2core

Starts a local Ray (2 CPUs), one async actor answering ten small hits as a node does, and calls it
as the router calls a node's `query` (text, entity, 32 shards, limit, window, prefixes, vector),
`--calls` times per way of sending the vector (an ndarray of 384 float32, its bytes, none), in
`--rounds` rounds, `--idle-ms` asleep before each call as between one client's queries. Per way:
p50 of the submission (`.remote()`) and of the round trip. Why router.node_client sends bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np
import ray


@ray.remote
class Answerer:
    async def query(self, *args):
        return [{"memory_id": "x" * 36, "similarity": 0.5}] * 10


async def measure(actor, vector, calls: int, idle_s: float) -> tuple[float, float]:
    submit, round_trip = [], []
    for _ in range(calls):
        time.sleep(idle_s)
        started = time.perf_counter()
        ref = actor.query.remote("text", None, list(range(32)), 10, None, None, vector)
        submitted = time.perf_counter()
        await ref
        submit.append(submitted - started)
        round_trip.append(time.perf_counter() - started)
    return statistics.median(submit) * 1000, statistics.median(round_trip) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    ways = {"ndarray": vector, "bytes": vector.tobytes(), "none": None}

    async def run() -> dict:
        actor = Answerer.remote()
        await actor.query.remote()
        out: dict[str, list] = {way: [] for way in ways}
        for _ in range(args.rounds):  # the ways in turn, so a busy machine slows all alike
            for way, value in ways.items():
                out[way].append(await measure(actor, value, args.calls, args.idle_ms / 1000))
        return out

    try:
        found = asyncio.run(run())
    finally:
        ray.shutdown()
    rows = {way: {"submit_p50_ms": [round(s, 3) for s, _ in r], "round_trip_p50_ms": [round(t, 3) for _, t in r]}
            for way, r in found.items()}
    doc = {"calls": args.calls, "rounds": args.rounds, "idle_ms": args.idle_ms, "ways": rows}
    lines = ["| vector sent as | submit p50 ms (each round) | round trip p50 ms (each round) |", "|---|---|---|"]
    lines += [f"| {way} | {' / '.join(map(str, r['submit_p50_ms']))} | {' / '.join(map(str, r['round_trip_p50_ms']))} |"
              for way, r in rows.items()]
    print(json.dumps(doc, indent=1))
    print("\n".join(lines))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        args.out.with_suffix(".md").write_text("# A query vector in a Ray call\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
