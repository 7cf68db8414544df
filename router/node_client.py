"""The router's one door to the node actors: a typed method per node call.

A node's methods are called over Ray by name with positional arguments (node.service.Node): this
module is the one place that knows those names and argument orders. It hides the transport
(`.remote`, ObjectRefs, timeouts, merged calls: router.coalesce) and turns what can go wrong into
the router's errors, in one place (`NodeClient._call`):
- a node's own failure (node.errors) into the API error it means (`api_error`), and a shard the
  node does not own (it moved) into `Moved`: read the placement again and retry (router.routing);
- an actor that is gone or cannot be reached into `NodeDown` (and the node is looked up again: a
  restarted `tellodb node` runs a new actor under its name), one that does not answer in time into
  `NodeSlow`; both are 503s when no other copy or retry helps;
- anything else into a 500 naming the node and the call, logged.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from typing import Any, Callable

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from node.config import ClusterConfig
from node.errors import DeadlineExceeded, NodeError, NotOwnedError, StorageFull, TooFewReplicas, is_disk_full
from node.names import actor_name
from node.records import IngestItem
from node.service import Node
from router.coalesce import Coalescer
from router.errors import ApiError, InsufficientStorage, Unavailable
from router.link import Link, Lost

log = logging.getLogger("tellodb")

Shards = int | list[int] | None  # one shard, several, or None: every shard the node is the primary of


class NodeDown(Unavailable):
    """A node's actor is gone (its machine, or a restart): the request may go elsewhere."""


class NodeSlow(Unavailable):
    """A node did not answer within the time given to it."""


class Moved(Exception):
    """A node does not own (or is handing over) a shard this router sent it: read the placement again."""


def api_error(exc: NodeError) -> ApiError:
    """The API error a node's failure means for the client."""
    if isinstance(exc, StorageFull):
        return InsufficientStorage(str(exc))
    if isinstance(exc, DeadlineExceeded):
        return Unavailable(f"{exc} (retry; with a memory_id a retry is an upsert)")
    if isinstance(exc, NotOwnedError):
        return Unavailable(f"{exc}; the placement changed, retry the request")
    if isinstance(exc, TooFewReplicas):
        return Unavailable(f"{exc} (retry; with a memory_id a retry is an upsert)")
    return ApiError(str(exc))


@dataclasses.dataclass(frozen=True)
class Query:
    """Best hits for `text` (within `window`), or without text the window's memories in time order;
    of one entity, or of every entity starting with one of `prefixes` (None: any)."""

    text: str | None
    entity_id: str | None
    limit: int
    window: tuple[int | None, int | None] | None = None
    prefixes: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class EdgesQuery:
    """Edges touching `nodes` (of one entity, or of every one), at most `per_node` per node and direction."""

    entity_id: str | None
    nodes: list[str]
    direction: str
    edge_types: list[str] | None
    per_node: int


@dataclasses.dataclass(frozen=True)
class Walk:
    """A breadth-first walk from `root` (node.graph_walk)."""

    root: str
    direction: str
    edge_types: list[str] | None
    depth: int
    breadth: int
    max_edges: int
    max_nodes: int

    def edges(self, entity_id: str | None, frontier: list[str]) -> EdgesQuery:
        """The edges one hop from `frontier` asks for."""
        return EdgesQuery(entity_id, frontier, self.direction, self.edge_types, self.breadth)


class NodeClient:
    """One node actor's calls; each takes at most `timeout_s` (None: the request's timeout)."""

    def __init__(self, name: str, actor: Any, nodes: Nodes, timeout_s: float | None = None) -> None:
        self.name = name
        self.actor = actor
        self.timeout_s = timeout_s
        self._nodes = nodes
        # Each merged call as the asyncio future of its Ray answer (what `await ref` makes), no task.
        self.coalescers = {method: Coalescer(lambda calls, method=method: asyncio.wrap_future(
                           actor.many.remote(method, calls).future())) for method in Node.MERGEABLE}

    def within(self, timeout_s: float) -> NodeClient:
        """The same node (and merged calls), each call given at most `timeout_s`."""
        limited = copy.copy(self)
        limited.timeout_s = timeout_s
        return limited

    # ---- the node's calls (node.service.Node) ---------------------------------------------------

    async def ingest(self, items: list[IngestItem], deadline: float) -> list[str | None]:
        return await self._call("ingest", items, deadline)

    async def ingest_free(self, items: list[IngestItem], deadline: float) -> list[str | None]:
        return await self._call("ingest_free", items, deadline)

    async def embed_query(self, text: str) -> np.ndarray:
        return await self._call("embed_query", text)

    async def query(self, q: Query, shards: Shards, vector: np.ndarray | None = None) -> list[dict[str, Any]]:
        """`vector` goes as its float32 bytes: Ray pickles an ndarray argument out of band, 0.2 ms
        more to submit a call here (docs/benchmarks.md)."""
        return await self._call("query", q.text, q.entity_id, shards, q.limit, q.window, q.prefixes,
                                None if vector is None else np.asarray(vector, dtype=np.float32).tobytes())

    async def edges(self, q: EdgesQuery, shards: Shards) -> list[dict[str, Any]]:
        return await self._call("edges", q.entity_id, shards, q.nodes, q.direction, q.edge_types, q.per_node)

    async def walk(self, w: Walk, entity_id: str, shard: int) -> dict[str, Any]:
        return await self._call("walk", entity_id, shard, w.root, w.direction, w.edge_types, w.depth, w.breadth,
                                w.max_edges, w.max_nodes)

    async def analytics(self, entity_id: str, shard: int, label: str, start_ms: int | None, end_ms: int | None,
                        bucket: str | None) -> dict[str, Any]:
        return await self._call("analytics", entity_id, shard, label, start_ms, end_ms, bucket)

    async def export_page(self, entity_id: str, shard: int, after_rowid: int, limit: int) -> list[dict[str, Any]]:
        return await self._call("export_page", entity_id, shard, after_rowid, limit)

    async def erase(self, entity_id: str, shards: Shards) -> dict[int, Any]:
        return await self._call("erase", entity_id, shards)

    async def inspect(self, memory_id: str, shard: int, include_window: bool, radius: int) -> dict | None:
        return await self._call("inspect", memory_id, [shard], include_window, radius)

    async def inspect_free(self, memory_id: str, include_window: bool, radius: int) -> dict | None:
        return await self._call("inspect_free", memory_id, include_window, radius)

    async def delete(self, memory_id: str, shard: int) -> bool:
        return await self._call("delete", memory_id, [shard])

    async def delete_free(self, memory_id: str) -> bool:
        return await self._call("delete_free", memory_id)

    async def delete_ids(self, pairs: list[tuple[str, int]]) -> int:
        return await self._call("delete_ids", pairs)

    async def profile(self, entity_id: str, shard: int, recent: int) -> dict[str, Any] | None:
        return await self._call("profile", entity_id, shard, recent)

    async def snapshot(self, shard: int) -> dict[str, Any]:
        return await self._call("snapshot", shard)

    async def read_snapshot(self, snapshot_id: str, offset: int, size: int) -> bytes:
        return await self._call("read_snapshot", snapshot_id, offset, size)

    async def drop_snapshot(self, snapshot_id: str) -> None:
        await self._call("drop_snapshot", snapshot_id)

    async def stats(self) -> dict[str, Any]:
        return await self._call("stats")

    async def replication_status(self) -> dict[str, Any]:
        return await self._call("replication_status")

    async def close(self) -> None:
        await self._call("close")

    # ---- the transport --------------------------------------------------------------------------

    async def _call(self, method: str, *args: Any) -> Any:
        node = self.name
        if self._nodes.link.rejoining:
            raise NodeDown(f"this router is joining the cluster again; {node} is called once it has")
        coalescer = self.coalescers.get(method)
        call = coalescer.call(args) if coalescer else getattr(self.actor, method).remote(*args)
        timeout = self.timeout_s or self._nodes.config.request_timeout_s
        try:
            return await self._nodes.link.answer(call, timeout)
        except (asyncio.TimeoutError, GetTimeoutError):
            raise NodeSlow(f"{node} did not answer within {timeout:g} s") from None
        except Lost:
            raise NodeDown("this router lost the cluster (the head restarted); the request is sent again once "
                           "it has joined again") from None
        except RayActorError:
            self._nodes.reresolve(node)
            raise NodeDown(f"{node} is down or restarting; retry the request") from None
        except (RayError, Exception) as exc:  # a Ray task error, or one a merged request got alone
            cause = exc
            while isinstance(cause, RayTaskError) and cause.cause is not None:  # a node's error, via other nodes
                cause = cause.cause
            if (isinstance(cause, RayError) and not isinstance(cause, RayTaskError)) or (
                    not isinstance(exc, RayTaskError) and type(cause).__module__.startswith("ray")):
                # Ray itself failed the call (its processes here or there are gone or restarting)
                self._nodes.reresolve(node)
                raise NodeDown(f"{node} could not be reached ({type(cause).__name__}); retry the request") from None
            if isinstance(cause, NotOwnedError):
                raise Moved(str(cause)) from None
            if isinstance(cause, NodeError):
                raise api_error(cause) from None
            if is_disk_full(cause):
                raise InsufficientStorage(f"{node}: the data volume is full") from None
            log.error("%s.%s failed: %s: %s", node, method, type(exc).__name__, exc)
            raise ApiError(f"{node} could not complete {method}") from None


class Nodes:
    """The node actors this router calls, by name. A node whose actor is gone is looked up again
    in the background (`reresolve`): one look-up per node at a time, and none while the head is
    away (Ray's look-up would wait for it)."""

    def __init__(self, config: ClusterConfig, link: Link) -> None:
        self.config = config
        self.link = link
        self.clients: dict[str, NodeClient] = {}
        self._resolving: set[str] = set()

    @property
    def actors(self) -> dict[str, Any]:
        return {name: c.actor for name, c in self.clients.items()}

    def add(self, name: str, actor: Any) -> None:
        self.clients[name] = NodeClient(name, actor, self)

    def clear(self) -> None:
        self.clients.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.clients

    def __iter__(self):
        return iter(self.clients)

    def __getitem__(self, name: str) -> NodeClient:
        """Node `name`'s client; NodeDown while it has not joined (again)."""
        if self.link.rejoining:
            raise NodeDown(f"this router is joining the cluster again; {name} is called once it has")
        client = self.clients.get(name)
        if client is None:
            self.reresolve(name)
            raise NodeDown(f"{name} has not joined the cluster (again) yet; retry the request")
        return client

    def reresolve(self, name: str) -> None:
        if name in self._resolving or not self.link.authority_up:
            return
        self._resolving.add(name)

        async def look() -> None:
            try:
                await self.find(name)
            finally:
                self._resolving.discard(name)

        asyncio.get_running_loop().create_task(look())

    async def find(self, name: str) -> None:
        """Use the actor that runs under node `name`'s name now, if there is one (and it is new)."""
        actor = await self.link.lookup(actor_name(name))
        known = self.clients.get(name)
        if actor is None or (known is not None and actor._actor_id == known.actor._actor_id):
            return
        if known is not None:
            log.info("Node %s is a new actor now (it restarted)", name)
        self.add(name, actor)

    def merged_calls(self) -> dict[str, dict[str, int]]:
        """Per node method: Ray calls made and the requests they carried (router.coalesce)."""
        return {f"{node}.{method}": {"calls": c.calls, "requests": c.requests}
                for node, client in self.clients.items() for method, c in client.coalescers.items()}


# ---- blocking calls for start-up (router.ray_cluster; no event loop runs yet) ----------------------

def node_infos(actors: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    """Each node's `info()`, once it has opened its shards."""
    return ray.get([a.info.remote() for a in actors.values()], timeout=timeout)


def register_old_free_ids(actors: dict[str, Any], home_node: Callable[[str], str]) -> int:
    """Shards written before free-form ids had homes (node.id_homes): record where their ids live
    (on `home_node(id)`); how many ids were registered."""
    found = dict(zip(actors, ray.get([a.unregistered_free_ids.remote() for a in actors.values()])))
    pairs = [(m, shard) for per_shard in found.values() for shard, ids in per_shard.items() for m in ids]
    by_home: dict[str, list[tuple[str, int]]] = {}
    for m, shard in pairs:
        by_home.setdefault(home_node(m), []).append((m, shard))
    ray.get([actors[node].register_homes.remote(p) for node, p in by_home.items()])
    ray.get([actors[node].mark_homes_registered.remote(list(per_shard))
             for node, per_shard in found.items() if per_shard])
    return len(pairs)
