"""`Node` as a Ray actor: one per machine slot, named so any router (or another node) can find it."""

from __future__ import annotations

import ray

from node.service import Node

NAMESPACE = "tellodb"
NodeActor = ray.remote(Node)


def actor_name(node: str) -> str:
    """The Ray actor name of node `node` in NAMESPACE."""
    return f"{NAMESPACE}-{node}"
