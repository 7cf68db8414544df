"""The router's view of the cluster, the one face the API uses: what each request asks of which nodes.

Each request method is the business logic only: an entity's requests go to its shard
(`Routing.execute`), requests that span entities to every node with its shards
(`Routing.everywhere`), merged by score or time. Routing owns the placement cache, retries after
a shard moved, read failover and the authority's failovers (router.routing); the typed node client
owns the calls and their errors (router.node_client); the control client the authority and the
cluster's shape (router.control_client); router.ray_cluster starting, joining and finding the
cluster in Ray.

`Cluster.start()` is `tellodb serve` (Ray, the authority and every node here); `Cluster.join()` is
`tellodb router` (the authority and nodes run elsewhere). The head may go away (router.membership):
requests go on from the cached placement, and when the head comes back as a new Ray cluster,
`watch` joins it again and finds the authority and the node actors by name. Whatever cannot be
routed meanwhile answers 503 with Retry-After, never 500; `ready()` says whether this router can
route now (`/ready`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from node import graph_walk
from node.config import ClusterConfig
from node.ids import parse_memory_id
from node.ranking import best_first, oldest_first
from node.records import Hits, IngestItem
from node.control.placement import Placement
from router import ray_cluster, tuning
from router.control_client import ControlClient
from router.errors import ApiError
from router.link import Link
from router.node_client import EdgesQuery, NodeClient, Nodes, Query, Walk
from router.query_embedder import QueryEmbedder
from router.ray_cluster import set_node_environment
from router.routing import Routing
from router.tuning import DEADLINE_MARGIN_S

log = logging.getLogger("tellodb")


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.link = Link()
        self.nodes = Nodes(config, self.link)
        self.control = ControlClient(config, self.link, self.nodes)
        self.routing = Routing(config, self.link, self.nodes, self.control)
        self.query_embedder = QueryEmbedder(config)
        self.node_info: dict[str, dict] = {}
        self.rejoins = 0
        self._owns_ray = False
        self._owns_nodes = False  # `tellodb serve` started its nodes; a router only uses them

    @property
    def placement(self) -> Placement:
        return self.routing.placement

    @property
    def actors(self) -> dict[str, Any]:
        return self.nodes.actors

    @property
    def authority_up(self) -> bool:
        return self.link.authority_up

    @property
    def rejoining(self) -> str | None:
        return self.link.rejoining

    @property
    def moved_retries(self) -> int:
        return self.routing.moved_retries

    @property
    def membership(self) -> Any:
        """router.membership.Membership of a `tellodb router` (it joins again when it loses the cluster)."""
        return self.control.membership

    @membership.setter
    def membership(self, membership: Any) -> None:
        self.control.membership = membership

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """`tellodb serve`: start (or join) Ray, the placement authority and every node actor here."""
        set_node_environment()
        self._owns_ray = ray_cluster.init_ray(self.config)
        self._owns_nodes = True
        self._use(ray_cluster.start(self.config))

    def join(self, wait_s: float = 600) -> None:
        """`tellodb router`: use the nodes of a running cluster (this process is already a Ray driver)."""
        self._use(ray_cluster.join(wait_s))

    def _use(self, found: ray_cluster.Found) -> None:
        self.control.authority = found.authority
        self.routing.placement = found.placement
        self.nodes.clear()  # handles of a lost cluster's actors never work again
        for name, actor in found.actors.items():
            self.nodes.add(name, actor)
        self.node_info.update({info["node"]: info for info in found.infos})

    def ready(self) -> tuple[bool, str | None]:
        """Whether this router can route requests now, and why not. Only while it joins the cluster
        again: with the head away it still routes by the last placement, and a shard without a live
        copy is the same for every router (a readiness probe that failed then would take them all
        out of service); `authority_up` and the cluster status say those."""
        reason = self.link.not_ready()
        return reason is None, reason

    async def watch(self) -> None:
        """Every second: is the authority there (and what does it report), and, for a `tellodb
        router`, is this process still part of the cluster (else join again)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.membership is not None:
                    reason = await asyncio.to_thread(self.membership.lost)
                    if reason is not None:
                        await self._rejoin(reason)
                        continue
                summary = await self.control.summary(timeout=2.0, max_age_s=0.0)
                self.link.authority_up = summary is not None
                if summary is None:
                    await self.control.find_authority()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("cluster watch: %s", exc)

    async def _rejoin(self, reason: str) -> None:
        """Join the cluster again: a new Ray node here, then the authority and the nodes by name.
        Requests meanwhile wait a little (router.routing), then answer 503."""
        self.link.lose(reason)
        log.warning("Router lost the cluster (%s); joining again", reason)
        started = time.monotonic()
        try:
            # Ray's driver is shut down here, on the event loop's own thread: no request handler can
            # use it meanwhile (that would end the process; router.membership.Membership.disconnect).
            await self.link.lookups_done(timeout=tuning.REJOIN_LOOKUP_WAIT_S)
            self.membership.disconnect()
            log.info("Router left the lost cluster seconds=%.1f", time.monotonic() - started)
            await asyncio.to_thread(self.membership.leave)
            await asyncio.to_thread(self.membership.join)
            found = await asyncio.to_thread(ray_cluster.find, self.placement)
            if found.placement.epoch < self.placement.epoch:  # a head that lost its disk starts lower: keep ours
                found.placement = self.placement
            self._use(found)
            self.control.forget_summary()
            self.rejoins += 1
            log.info("Router joined the cluster again seconds=%.1f epoch=%d nodes=%d", time.monotonic() - started,
                     self.placement.epoch, len(found.actors))
        finally:
            self.link.rejoined()

    async def close(self) -> None:
        """Let every node this process started finish in-flight work and checkpoint its shards."""
        await self.query_embedder.close()
        if not self.nodes.clients or not self._owns_nodes:
            return
        t = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.gather(*(c.close() for c in self.nodes.clients.values()),
                                                  return_exceptions=True), 20)
        except asyncio.TimeoutError:
            log.warning("nodes did not close within 20 s")
        log.info("Nodes closed seconds=%.1f", time.monotonic() - t)

    def shutdown(self) -> None:
        """Stop the actors and Ray processes this engine started (call outside the event loop)."""
        if self._owns_ray:
            ray_cluster.stop(self.nodes.actors)
            self.nodes.clear()

    # ---- requests -----------------------------------------------------------------------------

    async def ingest(self, items: list[IngestItem]) -> list[str | None]:
        """Store validated items, each placed on its entity's shard. Returns, in the order given, None for each
        stored item and the matched id for each one dropped as a near-duplicate.

        Items with `<entity>::...` ids go to their shard's node. A free-form id may have been
        written before under another entity: such items go to the node of the id's home shard,
        which moves the id in one operation (node.id_homes), so an id always names one memory.
        A write not committed when the router's timeout is near is dropped by its node, not
        committed later (DEADLINE_MARGIN_S). Each node stores its part of a batch all-or-nothing;
        when one part fails, the items the engine named itself (`generated_id`, so new for sure)
        are deleted from the parts that were stored, and the first failure is raised: retrying a
        failed batch never duplicates them, and items with the caller's ids are upserts anyway.
        """
        timeout = self.config.request_timeout_s
        deadline = time.time() + timeout - min(DEADLINE_MARGIN_S, timeout / 4)
        free = [parse_memory_id(it.memory_id).entity_prefix is None for it in items]
        home: list[int | None] = []

        def place() -> set[int]:
            """Each item's shard (and a free-form id's home) by the placement now, at every attempt
            (a split moves entities): the shards the attempt needs."""
            nonlocal items, home
            items = [it.placed(self.placement.shard_of(it.entity_id)) for it in items]
            home = [self.placement.id_home(it.memory_id) if f else None for it, f in zip(items, free)]
            return {h if h is not None else it.shard for it, h in zip(items, home)}

        async def part(node: NodeClient, shards: list[int]) -> list[tuple[list[int], Any]]:
            """The node's items: by their shard, or a free-form id's by its home (each group, its answer or error)."""
            mine = set(shards)
            groups = [(g, send) for g, send in (
                ([i for i, it in enumerate(items) if home[i] is None and it.shard in mine], node.ingest),
                ([i for i, h in enumerate(home) if h in mine], node.ingest_free)) if g]
            answers = await asyncio.gather(*(send([items[i] for i in g], deadline) for g, send in groups),
                                           return_exceptions=True)
            return [(g, answer) for (g, _), answer in zip(groups, answers)]

        async def settle(outcomes: list) -> list[str | None]:
            parts = [p for o in outcomes if not isinstance(o, BaseException) for p in o]
            stored = [(g, a) for g, a in parts if not isinstance(a, BaseException)]
            failures = [o for o in outcomes if isinstance(o, BaseException)] + [
                a for _, a in parts if isinstance(a, BaseException)]
            if failures:
                await self._take_back(items, stored)
                raise failures[0]
            duplicate_of: list[str | None] = [None] * len(items)
            for group, answer in stored:
                for i, dup in zip(group, answer):
                    duplicate_of[i] = dup
            return duplicate_of

        return await self.routing.everywhere(part, shards=place, settle=settle)

    async def _take_back(self, items: list[IngestItem], stored: list[tuple[list[int], list]]) -> None:
        """Delete the stored items with engine-made ids of a batch whose other parts failed."""
        by_node: dict[str, list[tuple[str, int]]] = {}
        for group, answer in stored:
            for i, dup in zip(group, answer):
                it = items[i]
                if it.generated_id and dup is None:
                    by_node.setdefault(self.placement.node_of_shard(it.shard), []).append((it.memory_id, it.shard))

        async def delete(node: str, pairs: list[tuple[str, int]]) -> int:
            return await self.nodes[node].delete_ids(pairs)

        results = await asyncio.gather(*(delete(node, pairs) for node, pairs in by_node.items()), return_exceptions=True)
        for node, result in zip(by_node, results):
            if isinstance(result, BaseException):
                log.error("a failed batch's items on %s could not be taken back: %s", node, result)

    async def embed_once(self, text: str) -> Any:
        """The vector of a query that every node answers, embedded by one node for all of them
        (not once per node), when this router does not embed it itself (router.query_embedder).
        The node is the one that holds the shard the text hashes to, so a repeated text meets its
        cached vector (node.embedder.EmbeddingCache); a read, so a follower answers when that node
        does not."""
        shard = self.placement.shard_of(text)
        return await self.routing.execute(shard, lambda node: node.embed_query(text), read=True)

    async def query(self, text: str | None, entity_id: str | None, limit: int,
                    window: tuple[int | None, int | None] | None = None,
                    prefixes: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Best hits for `text` (within `window`), or without text the window's memories in time order."""
        if entity_id is not None:
            q = Query(text, entity_id, limit, window)
            return await self.routing.for_entity(entity_id, lambda node, shard: node.query(q, shard), read=True)
        q = Query(text, None, limit, window, prefixes)
        vector, embedded = None, 0.0
        if text is not None and len(set(self.placement.owner)) > 1:  # primaries on more than one node
            started = time.perf_counter()
            vector = await self.query_embedder.embed(text)
            if vector is None:
                vector = await self.embed_once(text)
            embedded = time.perf_counter() - started
        parts = await self.routing.everywhere(lambda node, shards: node.query(q, shards, vector), read=True)
        hits = [h for part in parts for h in part]
        hits.sort(key=oldest_first if text is None else best_first)
        merged = Hits.merged(parts, hits[:limit])
        if embedded:
            merged.stages["embed"] = embedded
        return merged

    async def edges(self, nodes: list[str], direction: str, edge_types: list[str] | None, per_node: int,
                    entity_id: str | None) -> list[dict[str, Any]]:
        """Edges touching `nodes`: from the entity's shard, or from every node (merged, newest first)."""
        return await self._edges(EdgesQuery(entity_id, nodes, direction, edge_types, per_node))

    async def _edges(self, q: EdgesQuery) -> list[dict[str, Any]]:
        if q.entity_id is not None:
            return await self.routing.for_entity(q.entity_id, lambda node, shard: node.edges(q, shard), read=True)
        parts = await self.routing.everywhere(lambda node, shards: node.edges(q, shards), read=True)
        found = [e for part in parts for e in part]
        found.sort(key=lambda e: -e["timestamp_ms"])
        return found

    async def walk(self, root: str, direction: str, edge_types: list[str] | None, depth: int, breadth: int,
                   max_edges: int, max_nodes: int, entity_id: str | None) -> dict[str, Any]:
        """Breadth-first walk from `root` (node.graph_walk): within an entity's shard, one call to its
        node; across every entity, a fan-out per hop from here."""
        w = Walk(root, direction, edge_types, depth, breadth, max_edges, max_nodes)
        if entity_id is not None:
            return await self.routing.for_entity(entity_id, lambda node, shard: node.walk(w, entity_id, shard),
                                                 read=True)
        return await graph_walk.walk(root, lambda frontier: self._edges(w.edges(None, frontier)), depth, breadth,
                                     max_edges, max_nodes)

    async def analytics(self, entity_id: str, label: str, start_ms: int | None, end_ms: int | None,
                        bucket: str | None) -> dict[str, Any]:
        return await self.routing.for_entity(
            entity_id, lambda node, shard: node.analytics(entity_id, shard, label, start_ms, end_ms, bucket), read=True)

    async def export_entity(self, entity_id: str, page: int = 500):
        """Yield an entity's memories page by page (its shard holds them all)."""
        after = 0
        while True:
            rows = await self.routing.for_entity(
                entity_id, lambda node, shard: node.export_page(entity_id, shard, after, page), read=True)
            if not rows:
                return
            after = rows[-1]["rowid"]
            yield rows

    async def erase_entity(self, entity_id: str) -> dict[str, Any]:
        """Erase an entity on every node and shard; what was removed, per shard."""
        removed: dict[str, Any] = {}
        for part in await self.routing.everywhere(lambda node, shards: node.erase(entity_id, shards)):
            removed.update({str(s): counts for s, counts in part.items()})
        return removed

    async def inspect(self, memory_id: str, include_window: bool, radius: int) -> dict | None:
        entity = parse_memory_id(memory_id).entity_prefix  # an `<entity>::<session>::<turn>` id lives in its entity's shard
        if entity is not None:
            return await self.routing.for_entity(
                entity, lambda node, shard: node.inspect(memory_id, shard, include_window, radius), read=True)
        return await self.routing.for_home(  # the node that records where a free-form id lives (node.id_homes)
            memory_id, lambda node, _: node.inspect_free(memory_id, include_window, radius))

    async def delete(self, memory_id: str) -> bool:
        entity = parse_memory_id(memory_id).entity_prefix
        if entity is not None:
            return await self.routing.for_entity(entity, lambda node, shard: node.delete(memory_id, shard))
        return await self.routing.for_home(memory_id, lambda node, _: node.delete_free(memory_id))

    async def profile(self, entity_id: str, recent: int) -> dict[str, Any] | None:
        return await self.routing.for_entity(entity_id, lambda node, shard: node.profile(entity_id, shard, recent),
                                             read=True)

    async def snapshot(self, shard: int) -> dict[str, Any]:
        """A consistent copy of `shard` on its node (node.copy_calls.CopyCalls.snapshot, part of Node)."""
        return await self.routing.execute(shard, lambda node: node.snapshot(shard))

    async def read_snapshot(self, node: str, snapshot_id: str, offset: int, size: int) -> bytes:
        return await self.nodes[node].read_snapshot(snapshot_id, offset, size)

    async def drop_snapshot(self, node: str, snapshot_id: str) -> None:
        try:
            await self.nodes[node].drop_snapshot(snapshot_id)
        except ApiError as exc:  # it goes at the node's next start anyway
            log.warning("snapshot %s on %s not dropped: %s", snapshot_id, node, exc.message)

    # ---- the cluster's shape and counters (router.control_client) --------------------------------

    async def cluster_status(self) -> dict[str, Any]:
        return await self.control.cluster_status()

    async def placement_summary(self, timeout: float, max_age_s: float = 0.5) -> dict[str, Any] | None:
        return await self.control.summary(timeout, max_age_s)

    async def add_node(self, name: str) -> dict[str, Any]:
        return await self.control.add_node(name)

    async def remove_node(self, name: str) -> dict[str, Any]:
        return await self.control.remove_node(name)

    async def rebalance(self) -> dict[str, Any]:
        return await self.control.rebalance()

    async def split(self, shard: int | None) -> dict[str, Any]:
        return await self.control.split(shard)

    async def stats(self, timeout: float | None = None) -> dict[str, dict | None]:
        return await self.control.stats(timeout)

    def merged_calls(self) -> dict[str, dict[str, int]]:
        return self.nodes.merged_calls()
