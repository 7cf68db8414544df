"""The graph walk: breadth-first from a root over the edges ingest made of relations.

One function for both places a walk runs: on a node, over its own edges, when the walk is scoped
to an entity (its shard holds every edge, so the whole walk is one call: `Node.walk`), and in the
router, over every node's edges, when it is not (router.cluster.Cluster.walk, a fan-out per hop).
`edges(frontier)` answers the edges touching the frontier's nodes, at most `breadth` per node and
direction; the walk decides which of them to follow.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

Edges = Callable[[list[str]], Awaitable[list[dict[str, Any]]]]


async def walk(root: str, edges: Edges, depth: int, breadth: int, max_edges: int, max_nodes: int) -> dict[str, Any]:
    """`depth` hops from `root`, at most `breadth` edges followed per node and direction, stopping at
    `max_edges` edges or `max_nodes` nodes: `{"root", "nodes": [{id, depth}], "edges": [{..., depth}]}`."""
    depth_of = {root: 0}
    found_edges: list[dict[str, Any]] = []
    seen_edges: set[tuple] = set()
    frontier = [root]
    for hop in range(1, depth + 1):
        if not frontier or len(found_edges) >= max_edges:
            break
        in_frontier = set(frontier)
        followed: dict[str, int] = {}  # edges followed per frontier node, at most `breadth`
        next_frontier: list[str] = []
        for e in await edges(frontier):
            key = (e["source"], e["edge_type"], e["target"], e["memory_id"])
            if key in seen_edges:
                continue
            if len(found_edges) >= max_edges:
                break
            ends = [n for n in (e["source"], e["target"]) if n in in_frontier]
            if all(followed.get(n, 0) >= breadth for n in ends):
                continue
            for n in ends:
                followed[n] = followed.get(n, 0) + 1
            new = [n for n in (e["source"], e["target"]) if n not in depth_of]
            if len(depth_of) + len(new) > max_nodes:
                continue
            seen_edges.add(key)
            found_edges.append({**e, "depth": hop})
            for n in new:
                depth_of[n] = hop
                next_frontier.append(n)
        frontier = next_frontier
    nodes = [{"id": n, "depth": d} for n, d in sorted(depth_of.items(), key=lambda x: (x[1], x[0]))]
    return {"root": root, "nodes": nodes, "edges": found_edges}
