"""One node's query without an entity, in one process: p50 and stage times per scope.

    python loadtest/spanning_profile.py --prefixes user-,user-1,user-12 --out loadtest/results/spanning-profile-2core

Writes `--memories` memories of `--entities` entities (`user-0` ...) over `--shards` shards with
the engine's own store (loadtest/global_query.py's data set, random unit vectors), takes the even
shards as one node of two would hold them, loads its node index (node/node_index.py) and times
`node.spanning_search.search_shards` for `--queries` queries per scope: no prefix, then each of
`--prefixes` (what a key scoped to that entity-id prefix asks). No HTTP, no Ray, no embedding:
the node's own work, stage by stage (storage, ann, fts, fuse, hydrate), with the node's vector
blocks in their 4-bit scans (a read-mostly node's steady state: node/node_vectors.py; the wait
for stillness is cut to nothing here). `--idle-ms` sleeps between queries, as a node waits between
one client's queries: what it reads is then no longer in the caches. `--data-dir` keeps the data
set for the next run (a run of another checkout: PYTHONPATH=that checkout).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from global_query import build, texts_of, vectors_of  # noqa: E402
from texts import query_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", type=int, default=100_000)
    ap.add_argument("--entities", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--queries", type=int, default=100, help="per scope")
    ap.add_argument("--prefixes", default="user-,user-1,user-12")
    ap.add_argument("--data-dir", help="the data set's folder, kept (default: a temporary one)")
    ap.add_argument("--idle-ms", type=float, default=0.0, help="sleep this long before each timed query")
    ap.add_argument("--out", help="JSON here, Markdown beside it")
    args = ap.parse_args()

    import node.node_vectors
    from node.node_index import NodeIndex
    from node.shard_set import shard_dir
    from node.spanning_search import search_shards
    from node.store import ShardStore

    data = Path(args.data_dir or tempfile.mkdtemp(prefix="tellodb-spanning-"))
    if not (data / "shards").exists():
        texts = texts_of(args.memories)
        build(data, args.shards, texts, vectors_of(texts, Path("-"), random_vectors=True), args.entities)
    stores = {s: ShardStore(shard_dir(data, s), s, 384) for s in range(0, args.shards, 2)}
    index = NodeIndex(384)
    started = time.perf_counter()
    index.sync(stores, stores, 10**7)
    loaded = time.perf_counter() - started
    if hasattr(index.vectors, "settle"):  # every block still: its 4-bit scan built now
        node.node_vectors.SEAL_AFTER_S = 0.0
        index.vectors.blocks(list(stores))
        index.vectors.settle()
    rng = random.Random(5)
    texts = [query_text(rng) + f" {rng.randrange(10**9)}" for _ in range(args.queries)]
    vectors = np.random.default_rng(3).standard_normal((args.queries, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for prefix in [None, *[p for p in args.prefixes.split(",") if p]]:
        prefixes = (prefix,) if prefix else None
        for i in range(min(10, args.queries)):  # warm: every shard's matrices and pages
            search_shards(index, stores, vectors[i], texts[i], 10, None, prefixes)
        took, stages = [], {}
        for text, vector in zip(texts, vectors):
            time.sleep(args.idle_ms / 1000)
            t = time.perf_counter()
            search_shards(index, stores, vector, text, 10, None, prefixes, stages)
            took.append((time.perf_counter() - t) * 1000)
        rows.append({"prefix": prefix, "p50_ms": round(statistics.median(took), 2),
                     "stages_ms": {k: round(v / len(took) * 1000, 2) for k, v in stages.items()}})
        print(json.dumps(rows[-1]), file=sys.stderr)
    stats = index.stats()
    result = {"memories": index.rows, "shards": len(stores), "load_seconds": round(loaded, 1),
              "lexicon_mb": stats["lexicon_mb"], "vectors_mb": stats["vectors_mb"], "rows_mb": stats["rows_mb"],
              "four_bit_memories": stats.get("four_bit_memories", 0), "idle_ms": args.idle_ms, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"# One node's query without an entity: {index.rows:,} memories in {len(stores)} shards, in process",
                 "", f"Node index loaded in {result['load_seconds']} s: lexicon {stats['lexicon_mb']} MiB, "
                 f"vectors {stats['vectors_mb']} MiB (8-bit codes, and 4-bit for {result['four_bit_memories']:,} of the memories), "
                 f"the rows scoring reads {stats['rows_mb']} MiB; {args.idle_ms:g} ms idle before each query.", "", "| prefix | p50 ms | " + " | ".join(rows[0]["stages_ms"]) + " (mean ms) |",
                 "|---|---:|" + "---:|" * len(rows[0]["stages_ms"])]
        lines += [f"| {r['prefix'] or '(none)'} | {r['p50_ms']} | " + " | ".join(str(v) for v in r["stages_ms"].values())
                  + " |" for r in rows]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
