"""The Ray names of the cluster's actors and the one way to find them by name (`Handles`).

It imports nothing of the project, and Ray only when a handle is looked up, so that the node, the
authority and the router can all name each other without importing each other (and `router.roles`
can read NAMESPACE before Ray's settings are made).
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "tellodb"
AUTHORITY_NAME = "tellodb-placement"


def actor_name(node: str) -> str:
    """The Ray actor name of node `node` in NAMESPACE."""
    return f"{NAMESPACE}-{node}"


def _get_actor(name: str) -> Any:
    """The actor named `name` in NAMESPACE; ValueError when there is none, RuntimeError when Ray is
    not running here (Ray's get_actor would start a local Ray of its own)."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("Ray is not running")
    return ray.get_actor(name, namespace=NAMESPACE)


def authority() -> Any:
    """The placement authority's actor handle, or None when there is none (yet), or no Ray here."""
    try:
        return _get_actor(AUTHORITY_NAME)
    except (ValueError, RuntimeError):
        return None


class Handles:
    """Node actors' handles by node name, looked up once and kept. A node Ray restarted is a new
    actor: whoever finds a handle dead calls `forget` (or `get(..., fresh=True)`) to look it up again."""

    def __init__(self) -> None:
        self._found: dict[str, Any] = {}

    def get(self, node: str, fresh: bool = False) -> Any:
        """Node `node`'s actor; ValueError when there is none, RuntimeError when Ray is not running."""
        if fresh:
            self.forget(node)
        if node not in self._found:
            self._found[node] = _get_actor(actor_name(node))
        return self._found[node]

    def keep(self, node: str, handle: Any) -> None:
        """Keep a handle found another way (a search that already looked it up)."""
        self._found[node] = handle

    def forget(self, node: str) -> None:
        self._found.pop(node, None)
