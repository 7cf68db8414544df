"""What the embedder alone can do in the engine's process layout, against the raw limit.

    python loadtest/embed_layouts.py --out-dir loadtest/results --name embed-layouts-2core

The load tests compare the engine's single-ingest throughput with the raw embedder limit: one
process using every core on batches of 32 texts. The engine runs one embedder per node process,
one thread each, on the passes its requests make (about 5 texts for single ingests from 32
clients). This measures, with nothing else running, texts/s of:

- `1 process x all threads, batch 32` (the limit the load tests use),
- `1 process x all threads, batch 5`,
- `N processes x 1 thread, batch 32`, and `N processes x 1 thread, batch 5` (the engine's layout,
  N = cores),

so the share of the limit the layout itself allows can be told from what the rest of the engine
(HTTP, the router, Ray, SQLite) costs. Best of `--rounds` rounds each. JSON, Markdown and a PNG go
to `--out-dir`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))


def _embed(threads: int, batch: int, seconds: float, start, out) -> None:
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.embedder import load_embedder
    from texts import sentence

    with tempfile.TemporaryDirectory(prefix="tellodb-layout-") as cache:
        embedder = load_embedder(resolve_model_path(DEFAULT_MODEL), "onnx", "cpu", threads, cache)
    rng = random.Random(os.getpid())
    texts = [sentence(rng, i) for i in range(batch)]
    embedder.encode(texts)
    start.wait()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        embedder.encode(texts)
        done += batch
    out.put(done / (time.perf_counter() - t0))


def layout(processes: int, threads: int, batch: int, seconds: float) -> float:
    """Texts/s of `processes` embedders side by side, `threads` each, on batches of `batch`."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_embed, args=(threads, batch, seconds, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    time.sleep(8)  # every process has loaded its model (the export is cached after the first)
    start.set()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out-dir", default="loadtest/results")
    ap.add_argument("--name", default="embed-layouts-2core")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    layouts = {f"1 process x {cores} threads, batch 32": (1, cores, 32),
               f"1 process x {cores} threads, batch 5": (1, cores, 5),
               f"{cores} processes x 1 thread, batch 32": (cores, 1, 32),
               f"{cores} processes x 1 thread, batch 5": (cores, 1, 5)}
    result = {}
    for name, (p, t, b) in layouts.items():
        result[name] = round(max(layout(p, t, b, args.seconds) for _ in range(args.rounds)), 1)
        print(f"{name}: {result[name]} texts/s", file=sys.stderr, flush=True)
    limit = result[f"1 process x {cores} threads, batch 32"]
    report = {"cores": cores, "texts_per_second": result,
              "share_of_limit": {k: round(v / limit, 3) for k, v in result.items()}}
    print(json.dumps(report, indent=2))
    write_reports(report, Path(args.out_dir), args.name)


def write_reports(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = report["texts_per_second"]
    lines = [f"# The embedder alone, in the engine's layout ({report['cores']} cores)", "",
             "ONNX fp32, texts/s with nothing else running, best of the rounds; the share is against the load "
             "tests' raw limit (the first row).", "", "| layout | texts/s | share of the limit |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {report['share_of_limit'][k]} |" for k, v in rows.items()]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh(list(rows)[::-1], list(rows.values())[::-1])
        ax.set_xlabel("texts/s")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        lines += ["", f"![{name}.png]({name}.png)"]
    except ImportError:
        pass
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
