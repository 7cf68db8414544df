"""What a node reports about itself (`Node.stats`): per shard and in total, its caches, its
threads' busy time, its memory, and its moves and replication, for /stats and the router's metrics."""

from __future__ import annotations

import os
from typing import Any

STAT_KEYS = ("memories", "entities", "facts_current", "facts_stale", "edges", "edges_valid", "measurements",
             "unindexed", "vectors")


def own_memory_bytes() -> int | None:
    """This process's own (anonymous) resident memory, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def node_stats(node: Any) -> dict[str, Any]:
    """`node`'s (a node.service.Node) figures; on its store thread."""
    per_shard = {s: {**store.stats(), "role": "primary" if node.copies.is_primary(s) else "follower"}
                 for s, store in sorted(node.shards.items())}
    # Totals count primary copies only, so a cluster's sum over nodes counts each memory once.
    totals = {k: sum(v[k] for v in per_shard.values() if v["role"] == "primary") for k in STAT_KEYS}
    return {"node": node.name, "pid": os.getpid(), "shards_owned": len(node.copies.held), "shards_open": len(node.shards),
            **totals, "bytes": sum(v["bytes"] for v in per_shard.values()), "per_shard": per_shard,
            "embedder_passes": node.embedder.passes, "queries": node.queries,
            "embedding_cache": node.embedder.cache.stats(),
            "vector_cache": {"mb": round(node.vector_cache.bytes / 2**20, 1), "hits": node.vector_cache.hits,
                             "misses": node.vector_cache.misses},
            "node_index": node.searcher.index.stats(),
            "vector_indexes": node.index_budget.stats(), "memory_bytes": own_memory_bytes(),
            "query_seconds": round(node.query_seconds, 3),
            "index_yielded_seconds": round(node.store_thread.yielded_seconds, 3),  # chunks waiting for searches
            "busy_seconds": {"embed": round(node.embedder.busy_seconds, 3),
                             **{k: round(v, 3) for k, v in node.store_thread.busy.items()}},
            "group_commits": node.writer.group_commits, "grouped_writes": node.writer.grouped_writes,
            "placement_epoch": node.copies.placement.epoch, "moves": {**node.moves.state(), **node.splits.state()},
            "replication": {**node.replication.summary(), "lag_max": max(
                (r.store.last_seq() - link.acked for r in node.copies.replicas.values() if r.store is not None
                 for link in r.links.values() if link.acked is not None), default=0)}}
