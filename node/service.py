"""A node: the shard copies it holds behind an async API, the Ray actor's methods (node.actor).

`Node` is plain Python so it can be tested without Ray; `node.actor.NodeActor` is its Ray face,
which exposes exactly its public methods (node.actor.API): the client's (here) and the calls of
other nodes and the placement authority (node.copy_calls). Which copies it holds, in which role,
and whether a request may read or write them is the shard set's to say (node.shard_set, one
node.replica.Replica per copy). It delegates each job to one part: embedding to a batching
embedder on its own thread (node.embedder); all SQLite and Chroma work to one store thread
(node.store_thread); writes to the group-commit writer (node.writer); vectors reach Chroma behind
the writes through the background indexer (node.indexer); free-form ids whose home is here to
node.free_ids; shard copies to node.snapshots; moving a shard to or from another node to
node.moves (each write holds its shards open through the shard set's gate, so a move can fence them); a
shard's copies to node.replication (writes only on the primary, answered once every live follower
applied them; followers take the primary's changes through `apply_changes`). The event loop only
coordinates, so concurrent requests batch instead of queueing behind each other.

Start: a Ray actor's `__init__` runs before its event loop, so the background indexer starts in
`_start()`, which `info()` calls (the router calls it once every node is created) and every write
calls again (a restarted actor gets no `info()`); it is idempotent. `close()` finishes in-flight
writes, stops the indexer and checkpoints every shard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from node import graph_walk
from node.config import ClusterConfig, normalized_backend, resolve_model_path
from node.copy_calls import CopyCalls
from node.embedder import BatchingEmbedder, load_embedder
from node.errors import StorageFull, is_disk_full
from node.free_ids import FreeIds
from node.ids import parse_memory_id
from node.index_budget import IndexBudget
from node.indexer import Indexer
from node.moves import Moves
from node.splits import Splits
from node.names import Handles
from node.ranking import RankingConfig
from node.records import Hits, IngestItem
from node.replication import Replication
from node.control.placement import Placement
from node.shard_set import ShardSet
from node.node_stats import node_stats
from node.snapshots import Snapshots
from node.spanning_search import NodeSearch
from node.store import MemoryRecord, ShardStore, upsert_together
from node.store_thread import StoreThread
from node.vector_cache import VectorCache
from node.writer import GroupWriter

log = logging.getLogger("tellodb")

class Node(CopyCalls):
    def __init__(self, name: str, config: ClusterConfig, shards: list[int], threads: int = 1,
                 placement: Placement | None = None) -> None:
        started = time.monotonic()
        self.name = name
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.ranking = RankingConfig.load(self.data_dir)
        # With an ONNX backend this exports the model first if this machine has not yet (node.onnx_embedder).
        self.embedder = BatchingEmbedder(
            load_embedder(resolve_model_path(config.embedding.model, config.data_dir), normalized_backend(config),
                          config.embedding.device.lower(), threads, config.data_dir),
            max_batch=config.embedding.batch_size,
            max_wait_ms=config.embedding.max_wait_ms,
            max_chars=config.embedding.batch_chars,
            cache_entries=config.embedding.cache_entries,
        )
        self.embedder_seconds = time.monotonic() - started
        self.store_thread = StoreThread(name)
        self.copies = ShardSet(name, self.data_dir, shards, placement or Placement(config.shards, tuple(config.node_names)),
                               self.store_thread, self._open_store)
        self._keep_placement()
        self.vector_cache = VectorCache(config.vector_cache_mb << 20)
        self.searcher = NodeSearch(self.copies, self.embedder.dimension)
        self.index_budget = IndexBudget(config.index_memory_mb << 20)
        self.reindexed = 0
        self.indexer = Indexer(name, self.store_thread, lambda: list(self.shards.values()), config.changelog_keep)
        self.writer = GroupWriter(
            name, self.data_dir, config.min_free_mb, self.store_thread, self.indexer,
            commit=lambda by_shard: upsert_together([(self.copies.store(s), batch) for s, batch in by_shard.items()]),
            duplicate=self._duplicate)
        self.peers = Handles()
        self.free_ids = FreeIds(self.copies, self.peers, self)
        self.moves = Moves(self.copies, self.peers, self.vector_cache)
        self.splits = Splits(self.copies, self.vector_cache, self._open_store)
        self.replication = Replication(self.copies, self.peers, config)
        self.snapshots = Snapshots(self.data_dir, name)
        self.queries = 0
        self.query_seconds = 0.0  # wall time of queries inside the node (embed, search and the hand-offs)
        # Open the shards that exist on disk now (re-indexing what a crash left behind); the others
        # are created on their first write.
        for shard in sorted(self.copies.held):
            if (self.copies.root(shard) / "store.sqlite3").exists():
                self.reindexed += self.copies.store(shard).reconcile()
        self.startup_seconds = time.monotonic() - started

    @property
    def shards(self) -> dict[int, ShardStore]:
        """The open copies' stores, by shard."""
        return self.copies.stores

    @property
    def group_commits(self) -> int:
        return self.writer.group_commits

    @property
    def grouped_writes(self) -> int:
        return self.writer.grouped_writes

    def _start(self) -> None:
        """Start the background work (needs the running event loop); idempotent."""
        self.indexer.start()
        self.replication.sync()

    # ---- helpers ------------------------------------------------------------------------------

    def _open_store(self, shard: int, root: Path | None = None) -> ShardStore:
        """Open (or create) the shard's folder here (or `root`: a split's half), owned or not (on the store thread)."""
        h = self.config.hnsw
        root = root or self.copies.root(shard)
        new = not root.exists()
        try:
            return ShardStore(
                root, shard, self.embedder.dimension,
                {"connectivity": h.connectivity, "ef_search": h.ef_search, "ef_construction": h.ef_construction},
                self.ranking, self.vector_cache, self.index_budget,
            )
        except Exception as exc:
            if new:  # a shard created half-way (a full disk) must not look like one that exists
                shutil.rmtree(root, ignore_errors=True)
            if is_disk_full(exc):
                raise StorageFull(f"{self.name}: the data volume is full; shard {shard} cannot be created") from None
            raise

    @asynccontextmanager
    async def _writing(self, shards: Iterable[int]):
        """Hold `shards` open for one write (a move's fence waits for it), or NotOwnedError; once
        the write has committed, wait until the shards' live followers hold it (node.replication)."""
        shards = self.copies.check_writable(shards)
        with self.copies.gate.writing(shards):
            yield
            await self.replication.wait(shards)

    def _shard_list(self, shard: int | list[int] | tuple[int, ...] | None, entity_id: str | None = None
                    ) -> list[int] | None:
        """A request's shards: one (checked to hold `entity_id` when given), several (from a router's
        placement with as many shards as this view: node.records.ShardList), or None (every shard
        owned here)."""
        if shard is None:
            return None
        if isinstance(shard, int):
            if entity_id is not None:
                self.copies.check_entity(entity_id, shard)
            return [int(shard)]
        self.copies.check_shard_count(shard)
        return [int(s) for s in shard]

    # ---- API ----------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        self._start()
        e = self.embedder.embedder
        return {
            "node": self.name,
            "pid": os.getpid(),
            "model": e.model_path,
            "dimension": e.dimension,
            "device": e.device,
            "backend": normalized_backend(self.config),
            "threads": e.threads,
            "model_file": str(e.onnx_path) if getattr(e, "onnx_path", None) else None,  # an exported ONNX file
            "embedder_seconds": round(self.embedder_seconds, 3),
            "shards_owned": len(self.copies.held),
            "shards_open": len(self.shards),
            "reindexed": self.reindexed,
            "startup_seconds": round(self.startup_seconds, 3),
            "ranking": asdict(self.ranking),
        }

    MERGEABLE = ("embed_query", "ingest", "query")

    async def many(self, method: str, calls: list[tuple]) -> list[Any]:
        """Run requests the router merged into one Ray call (`router.coalesce`) concurrently, so they
        share embedding passes and group commits; per request, its result or its exception."""
        if method not in self.MERGEABLE:
            raise ValueError(f"{method} cannot be merged")
        return await asyncio.gather(*(getattr(self, method)(*args) for args in calls), return_exceptions=True)

    async def ingest(self, items: list[IngestItem], deadline: float | None = None) -> list[str | None]:
        """Embed and store `items` (validated, each with its `shard`); answer after the commit.

        Returns, per item, None when it was stored, or the id of the memory it duplicates when it
        asked for `enable_semantic_dedup` and one of its entity's memories (stored, or earlier in
        this call) has cosine >= `dedup_cosine` with it. A write whose commit would start after
        `deadline` (time.time()) is dropped with DeadlineExceeded: the caller has given up on it,
        and it must not land later. A volume below the free-space reserve: StorageFull.
        """
        self._start()
        for it in items:
            self.copies.check_entity(it.entity_id, it.shard)
        shards = self.copies.check_writable(it.shard for it in items)
        self.writer.check_space()
        vectors = await self.embedder.embed([it.textual_content for it in items])
        records = [MemoryRecord(
            memory_id=it.memory_id,
            entity_id=it.entity_id,
            session_id=it.session_id,
            turn_index=it.turn_index,
            created_at_ms=it.created_at_ms,
            kind=it.kind,
            textual_content=it.textual_content,
            relations=tuple(tuple(r) for r in it.relations),
            vector=vec,
            metrics=tuple((label, float(value)) for label, value in it.metrics),
            fact_key=it.fact_key,
        ) for it, vec in zip(items, vectors)]
        # In flight from here (not from entry): a fence waits for commits, not for embedding passes.
        async with self._writing(shards):
            return await self.writer.write(items, records, deadline)

    def _duplicate(self, record: MemoryRecord, shard: int, earlier: list[MemoryRecord]) -> str | None:
        """The id of a memory of the same entity that `record` nearly repeats, if any: one stored,
        or one accepted earlier in this group of writes."""
        threshold = self.ranking.dedup_cosine
        for other in reversed(earlier):
            if (other.entity_id == record.entity_id and other.memory_id != record.memory_id
                    and float(other.vector @ record.vector) >= threshold):
                return other.memory_id
        if self.copies.readable([shard]):
            near = self.copies.store(shard).nearest(record.entity_id, record.vector, record.memory_id)
            if near is not None and near[1] >= threshold:
                return near[0]
        return None

    async def embed_query(self, text: str) -> np.ndarray:
        """A query text's vector (cached: node.embedder.EmbeddingCache). A query that spans nodes
        is embedded once, by one of them, and the vector goes to every node (`query(vector=)`)."""
        return await self.embedder.embed_query(text)

    async def query(self, text: str | None, entity_id: str | None, shard: int | list[int] | None, limit: int,
                    window: tuple[int | None, int | None] | None = None,
                    prefixes: tuple[str, ...] | None = None,
                    vector: np.ndarray | bytes | None = None) -> list[dict[str, Any]]:
        """Hits from one shard (an entity's), from a list of shards, or from every shard here
        (`shard=None`), only entities starting with one of `prefixes` if given, best first, created
        within `window` if given. Without `text`: the window's memories, oldest first. A named
        shard that is not owned here: NotOwnedError. `vector`: the text's, embedded already (as
        float32 bytes from the router: router.node_client)."""
        async with self.store_thread.searching():
            return await self._query(text, entity_id, shard, limit, window, prefixes, vector)

    async def _query(self, text: str | None, entity_id: str | None, shard: int | list[int] | None, limit: int,
                     window: tuple[int | None, int | None] | None,
                     prefixes: tuple[str, ...] | None, vector: np.ndarray | bytes | None) -> list[dict[str, Any]]:
        started = time.perf_counter()
        if isinstance(vector, bytes):
            vector = np.frombuffer(vector, dtype=np.float32)
        shards = self._shard_list(shard, entity_id)
        stages: dict[str, float] = {}
        if text is not None and vector is None:
            vector = await self.embedder.embed_query(text)
            stages["embed"] = time.perf_counter() - started

        def search() -> Hits:
            return Hits(self.searcher.search(self.copies.readable(shards), vector, text, entity_id, limit, window,
                                             prefixes, stages), stages)

        try:
            return await self.copies.run(search, busy="search")
        finally:
            self.queries += 1
            self.query_seconds += time.perf_counter() - started

    async def edges(self, entity_id: str | None, shard: int | list[int] | None, nodes: list[str], direction: str,
                    edge_types: list[str] | None, per_node: int) -> list[dict[str, Any]]:
        shards = self._shard_list(shard, entity_id)

        def collect() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for s in self.copies.readable(shards):
                found.extend(self.copies.store(s).edges(entity_id, nodes, direction, edge_types, per_node))
            return found

        return await self.copies.run(collect)

    async def analytics(self, entity_id: str, shard: int, label: str, start_ms: int | None, end_ms: int | None,
                        bucket: str | None) -> dict[str, Any]:
        self.copies.check_entity(entity_id, shard)

        def compute() -> dict[str, Any]:
            if not self.copies.readable([shard]):
                return self._empty_analytics(bucket)
            return self.copies.store(shard).analytics(entity_id, label, start_ms, end_ms, bucket)

        return await self.copies.run(compute)

    @staticmethod
    def _empty_analytics(bucket: str | None) -> dict[str, Any]:
        empty: dict[str, Any] = {"count": 0, "sum": 0.0, "avg": None, "min": None, "max": None, "stddev": None}
        return {**empty, "buckets": []} if bucket else empty

    async def export_page(self, entity_id: str, shard: int, after_rowid: int, limit: int) -> list[dict[str, Any]]:
        self.copies.check_entity(entity_id, shard)

        def page() -> list[dict[str, Any]]:
            shards = self.copies.readable([shard])
            return self.copies.store(shard).export_page(entity_id, after_rowid, limit) if shards else []

        return await self.copies.run(page)

    async def erase(self, entity_id: str, shard: int | list[int] | None = None) -> dict[str, Any]:
        """Erase an entity from the given shards, or every shard here; per-shard counts of what was removed."""
        shards = self._shard_list(shard, entity_id)
        async with self._writing(self.copies.primaries() if shards is None else shards):
            return await self._erase(entity_id, shards)

    async def _erase(self, entity_id: str, shards: list[int] | None) -> dict[str, Any]:
        def erase_all() -> tuple[dict[str, Any], list[str]]:
            removed, free = {}, []
            for s in self.copies.readable(shards):
                free += [m for (m,) in self.copies.store(s).db.execute("SELECT memory_id FROM memories WHERE entity_id = ?",
                                                                 (entity_id,)) if parse_memory_id(m).entity_prefix is None]
                counts = self.copies.store(s).erase(entity_id)
                if any(counts.values()):
                    removed[s] = counts
            return removed, free

        removed, free = await self.copies.run(erase_all)
        await self.free_ids.forget_erased(free)
        return removed

    async def inspect(self, memory_id: str, shards: list[int] | None, include_window: bool, radius: int) -> dict | None:
        self.copies.check_named(memory_id, shards)

        def find() -> dict | None:
            for s in self.copies.readable(shards):
                store = self.copies.store(s)
                memory = store.get(memory_id)
                if memory is None:
                    continue
                if include_window:
                    memory["turn_window"] = store.turn_window(memory_id, radius)
                return {**memory, "shard": s, "node": self.name}
            return None

        return await self.copies.run(find)

    async def delete_ids(self, pairs: list[tuple[str, int]]) -> int:
        """Delete each (memory_id, shard) in one store call; return how many were there."""
        async with self._writing(s for _, s in pairs):
            return await self.copies.run(lambda: sum(self.copies.store(s).delete(m) for m, s in pairs))

    async def delete(self, memory_id: str, shards: list[int] | None) -> bool:
        self.copies.check_named(memory_id, shards)

        def remove() -> bool:
            return any([self.copies.store(s).delete(memory_id) for s in self.copies.readable(shards)])

        async with self._writing(self.copies.primaries() if shards is None else shards):
            return await self.copies.run(remove)

    # ---- free-form ids (node.free_ids): this node is the home of the ids hashed to its shards ----

    async def ingest_free(self, items: list[IngestItem], deadline: float | None = None) -> list[str | None]:
        """Write items whose free-form ids have their home here: each id ends up in exactly one
        shard, its item's, however many writers race (see node.id_homes). Answers as `ingest`."""
        async with self._writing(self._homes(it.memory_id for it in items)):
            return await self.free_ids.ingest(items, deadline)

    async def inspect_free(self, memory_id: str, include_window: bool, radius: int) -> dict | None:
        return await self.free_ids.inspect(memory_id, include_window, radius)

    async def delete_free(self, memory_id: str) -> bool:
        async with self._writing(self._homes([memory_id])):
            return await self.free_ids.delete(memory_id)

    async def forget_homes(self, ids: list[str]) -> None:
        """Drop the home records of an erased entity's free-form ids, and their log entries."""
        async with self._writing(self._homes(ids)):
            await self.free_ids.forget(ids)

    def _homes(self, ids: Iterable[str]) -> set[int]:
        return {self.copies.placement.id_home(m) for m in ids}

    async def unregistered_free_ids(self) -> dict[int, list[str]]:
        """Per shard here that predates id homes: its free-form ids (to register at their homes)."""
        return await self.free_ids.unregistered()

    async def register_homes(self, pairs: list[tuple[str, int]]) -> None:
        """Record the shard of free-form ids found in old shards, unless the id already has a home."""
        async with self._writing(self._homes(m for m, _ in pairs)):
            await self.free_ids.register(pairs)

    async def mark_homes_registered(self, shards: list[int]) -> None:
        async with self._writing(shards):
            await self.free_ids.mark_registered(shards)

    async def stats(self) -> dict[str, Any]:
        return await self.copies.run(lambda: node_stats(self))

    async def profile(self, entity_id: str, shard: int, recent: int) -> dict[str, Any] | None:
        self.copies.check_entity(entity_id, shard)

        def collect() -> dict[str, Any] | None:
            return self.copies.store(shard).profile(entity_id, recent) if self.copies.readable([shard]) else None

        return await self.copies.run(collect)

    async def close(self) -> None:
        """Finish in-flight writes, checkpoint every shard's WAL, release files."""
        self.replication.close()
        await self.writer.flush()
        await self.indexer.close()  # what is still unindexed is indexed by reconcile() at start-up
        await self.embedder.close()

        def close_all() -> None:
            for replica in [*self.copies.replicas.values(), *(i.replica for i in self.moves.incoming.values())]:
                store, replica.store = replica.store, None
                if store is not None:
                    store.close()
            for halves in self.splits.pending.values():
                for store in halves.stores.values():
                    store.close()
            self.searcher.close()

        await self.copies.run(close_all)
        self.store_thread.shutdown()

    async def walk(self, entity_id: str, shard: int, root: str, direction: str, edge_types: list[str] | None,
                   depth: int, breadth: int, max_edges: int, max_nodes: int) -> dict[str, Any]:
        """A graph walk within an entity's shard, every hop here: one Ray call, not one per hop."""
        return await graph_walk.walk(root, lambda frontier: self.edges(entity_id, shard, frontier, direction, edge_types,
                                                            breadth), depth, breadth, max_edges, max_nodes)
