"""`Node` as a Ray actor: one per node name, named so any router (or another node) can find it.

`start_node_actor` creates it the same way for `tellodb serve` (every node in one tree) and for
`tellodb node` (one per machine slot, pinned there by a node label, so it runs with its data and
nowhere else). The actor asks the placement authority for its shards when it starts, so a node
Ray restarts after a crash opens the shards it owns now, not the ones it owned when created.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import ray

from node.config import ClusterConfig
from node.control.placement import Placement
from node.names import NAMESPACE, actor_name, authority
from node.service import Node

log = logging.getLogger("tellodb")


class PlacedNode(Node):
    """A node whose shards are the ones the placement authority gives it at each (re)start."""

    def __init__(self, name: str, config: ClusterConfig, placement: Placement, threads: int = 1) -> None:
        # Only a restart needs to ask (and a blocking call in an async actor is worth avoiding otherwise).
        found = authority() if ray.get_runtime_context().was_current_actor_reconstructed else None
        if found is not None:
            placement = max(placement, ray.get(found.placement.remote(), timeout=60), key=lambda p: p.epoch)
        super().__init__(name, config, placement.shards_of(name), threads, placement)


class ExposedNode:
    """The Ray face of a node: exactly `API`, the node's public methods, each awaited on the node it
    holds. Ray exposes every method of an actor's class, private ones too, so the actor's class is
    this face and not `Node` itself; `Node`'s helpers stay callable only from inside."""

    def __init__(self, name: str, config: ClusterConfig, placement: Placement, threads: int = 1) -> None:
        self._node = PlacedNode(name, config, placement, threads)


API: tuple[str, ...] = tuple(sorted(name for name, _ in inspect.getmembers(Node, inspect.isfunction)
                                    if not name.startswith("_")))


def _expose(name: str) -> Any:
    method = getattr(Node, name)

    async def call(self: ExposedNode, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self._node, name)(*args, **kwargs)

    call.__name__, call.__doc__ = name, method.__doc__
    call.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]  # Ray checks calls against it
    return call


for _name in API:
    setattr(ExposedNode, _name, _expose(_name))

NodeActor = ray.remote(ExposedNode)


def start_node_actor(name: str, config: ClusterConfig, placement: Placement, cpus: float, threads: int,
                     label_selector: dict[str, str] | None = None) -> Any:
    """Create (or find) node `name`'s actor. `max_restarts=-1`: Ray restarts it after a crash,
    on the same Ray node when `label_selector` pins it there."""
    options: dict[str, Any] = dict(
        name=actor_name(name), namespace=NAMESPACE, num_cpus=cpus, max_concurrency=1024, max_restarts=-1,
        get_if_exists=True,
        # Hundreds of calls a second would each leave a task event in Ray's GCS (for the
        # dashboard's task list): its memory grew 34% in a one-minute load test.
        enable_task_events=False)
    if label_selector:
        options["label_selector"] = label_selector
    return NodeActor.options(**options).remote(name, config, placement, threads)
