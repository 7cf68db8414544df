"""A node: the shards it owns behind an async API, the Ray actor's methods (node.actor).

`Node` is plain Python so it can be tested without Ray; `node.actor.NodeActor` is the same class
as a Ray actor. It owns the shard set and delegates each job to one part: embedding to a batching
embedder on its own thread (node.embedder); all SQLite and Chroma work to one store thread
(node.store_thread); writes to the group-commit writer (node.writer); vectors reach Chroma behind
the writes through the background indexer (node.indexer); free-form ids whose home is here to
node.free_ids; shard copies to node.snapshots; moving a shard to or from another node to
node.moves (each write holds its shards open through `moves.gate`, so a move can fence them); a
shard's copies to node.replication (writes only on the primary, answered once every live follower
applied them; followers take the primary's changes through `apply_changes`). The event loop only
coordinates, so concurrent requests batch instead of queueing behind each other.

Start: a Ray actor's `__init__` runs before its event loop, so the background indexer starts in
`start()`, which `info()` calls (the router calls it once every node is created) and every write
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

from node.config import ClusterConfig, normalized_backend, resolve_model_path
from node.embedder import BatchingEmbedder, load_embedder
from node.errors import NotOwnedError, StorageFull, is_disk_full
from node.free_ids import FreeIds
from node.ids import parse_memory_id
from node.index_budget import IndexBudget
from node.indexer import Indexer
from node.moves import MOVE_PIN, Moves
from node.names import NAMESPACE, actor_name
from node import placement_file
from node.ranking import RankingConfig, best_first, oldest_first
from node.records import IngestItem
from node.replication import Replication
from node.ring import Placement
from node.snapshots import Snapshots
from node.store import MemoryRecord, ShardStore, upsert_together
from node.store_thread import StoreThread
from node.vector_cache import VectorCache
from node.writer import GroupWriter

log = logging.getLogger("tellodb")

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


def shard_dir(data_dir: str | Path, shard: int) -> Path:
    return Path(data_dir) / "shards" / f"{shard:04d}"


class Node:
    def __init__(self, name: str, config: ClusterConfig, shards: list[int], threads: int = 1,
                 placement: Placement | None = None) -> None:
        started = time.monotonic()
        self.name = name
        self.config = config
        self.owned = set(shards)  # changed on the store thread only (moves), which reads it too
        self.placement = placement or Placement(config.shards, tuple(config.node_names))
        self.data_dir = Path(config.data_dir)
        self._keep_placement()
        self.ranking = RankingConfig.load(self.data_dir)
        # With an ONNX backend this exports the model first if this machine has not yet (node.onnx_embedder).
        self.embedder = BatchingEmbedder(
            load_embedder(resolve_model_path(config.embedding.model, config.data_dir), normalized_backend(config),
                          config.embedding.device.lower(), threads, config.data_dir),
            max_batch=config.embedding.batch_size,
            max_wait_ms=config.embedding.max_wait_ms,
            max_chars=config.embedding.batch_chars,
        )
        self.embedder_seconds = time.monotonic() - started
        self.store_thread = StoreThread(name)
        self.shards: dict[int, ShardStore] = {}
        self.vector_cache = VectorCache(config.vector_cache_mb << 20)
        self.index_budget = IndexBudget(config.index_memory_mb << 20)
        self.reindexed = 0
        self.indexer = Indexer(name, self.store_thread, lambda: list(self.shards.values()), config.changelog_keep)
        self.writer = GroupWriter(
            name, self.data_dir, config.min_free_mb, self.store_thread, self.indexer,
            commit=lambda by_shard: upsert_together([(self._shard(s), batch) for s, batch in by_shard.items()]),
            duplicate=self._duplicate)
        self.free_ids = FreeIds(self)
        self.moves = Moves(self)
        self.replication = Replication(self)
        self._peers: dict[str, Any] = {}
        self.snapshots = Snapshots(self.data_dir, name)
        self.queries = 0
        self.query_seconds = 0.0  # wall time of queries inside the node (embed, search and the hand-offs)
        # Open the shards that exist on disk now (re-indexing what a crash left behind); the others
        # are created on their first write.
        for shard in sorted(self.owned):
            if (shard_dir(self.data_dir, shard) / "store.sqlite3").exists():
                self.reindexed += self._shard(shard).reconcile()
        self.startup_seconds = time.monotonic() - started

    @property
    def group_commits(self) -> int:
        return self.writer.group_commits

    @property
    def grouped_writes(self) -> int:
        return self.writer.grouped_writes

    def start(self) -> None:
        """Start the background work (needs the running event loop); idempotent."""
        self.indexer.start()
        self.replication.sync()

    # ---- helpers ------------------------------------------------------------------------------

    def _shard(self, shard: int) -> ShardStore:
        if shard not in self.owned:
            raise NotOwnedError(f"shard {shard} is not owned by {self.name}")
        store = self.shards.get(shard)
        if store is None:
            store = self.shards[shard] = self._open_store(shard)
        return store

    def shard_root(self, shard: int) -> Path:
        return shard_dir(self.data_dir, shard)

    def _open_store(self, shard: int) -> ShardStore:
        """Open (or create) the shard's folder here, owned or not (on the store thread)."""
        h = self.config.hnsw
        root = shard_dir(self.data_dir, shard)
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

    def peer(self, node: str):
        """Another node's Ray actor (None for this node)."""
        if node == self.name:
            return None
        if node not in self._peers:
            import ray

            self._peers[node] = ray.get_actor(actor_name(node), namespace=NAMESPACE)
        return self._peers[node]

    def is_primary(self, shard: int) -> bool:
        """Whether this node holds `shard`'s primary copy, by its placement view."""
        return shard in self.owned and self.placement.owner[shard] == self.name

    def _primaries(self) -> set[int]:
        return {s for s in self.owned if self.is_primary(s)}

    def _check_writable(self, shards: Iterable[int]) -> set[int]:
        """NotOwnedError unless this node holds the primary copy of every shard and none is fenced
        by a move: a follower copy takes writes only from its primary (`apply_changes`)."""
        shards = set(shards)
        for s in shards:
            if s not in self.owned:
                raise NotOwnedError(f"shard {s} is not owned by {self.name}")
            if self.placement.owner[s] != self.name:
                raise NotOwnedError(f"shard {s}: this node holds a follower copy; writes go to the primary")
        self.moves.gate.check(shards)
        return shards

    @asynccontextmanager
    async def _writing(self, shards: Iterable[int]):
        """Hold `shards` open for one write (a move's fence waits for it), or NotOwnedError; once
        the write has committed, wait until the shards' live followers hold it (node.replication)."""
        shards = self._check_writable(shards)
        with self.moves.gate.writing(shards):
            yield
            await self.replication.wait(shards)

    @staticmethod
    def _shard_list(shard: int | list[int] | tuple[int, ...] | None) -> list[int] | None:
        """A request's shards: one, several, or None (every shard owned here)."""
        if shard is None:
            return None
        return [int(shard)] if isinstance(shard, int) else [int(s) for s in shard]

    async def _on_store(self, fn, *args, busy: str | None = None):
        return await self.store_thread.run(fn, *args, busy=busy)

    # ---- API ----------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        self.start()
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
            "shards_owned": len(self.owned),
            "shards_open": len(self.shards),
            "reindexed": self.reindexed,
            "startup_seconds": round(self.startup_seconds, 3),
            "ranking": asdict(self.ranking),
        }

    MERGEABLE = ("ingest", "query")

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
        self.start()
        shards = self._check_writable(it.shard for it in items)
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
        if self._candidate_shards([shard]):
            near = self.shards[shard].nearest(record.entity_id, record.vector, record.memory_id)
            if near is not None and near[1] >= threshold:
                return near[0]
        return None

    async def query(self, text: str | None, entity_id: str | None, shard: int | list[int] | None, limit: int,
                    window: tuple[int | None, int | None] | None = None,
                    prefixes: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Hits from one shard (an entity's), from a list of shards, or from every shard here
        (`shard=None`), only entities starting with one of `prefixes` if given, best first, created
        within `window` if given. Without `text`: the window's memories, oldest first. A named
        shard that is not owned here: NotOwnedError."""
        async with self.store_thread.searching():
            return await self._query(text, entity_id, shard, limit, window, prefixes)

    async def _query(self, text: str | None, entity_id: str | None, shard: int | list[int] | None, limit: int,
                     window: tuple[int | None, int | None] | None,
                     prefixes: tuple[str, ...] | None) -> list[dict[str, Any]]:
        started = time.perf_counter()
        shards = self._shard_list(shard)
        vector = (await self.embedder.embed([text]))[0] if text is not None else None

        def search() -> list[dict[str, Any]]:
            hits: list[dict[str, Any]] = []
            for s in self._candidate_shards(shards):
                store = self.shards[s]
                hits.extend(store.search(vector, text, entity_id, limit, window, prefixes) if text is not None
                            else store.in_window(entity_id, window, limit, prefixes))
            if text is None:
                hits.sort(key=oldest_first)
            else:
                hits.sort(key=best_first)
            return hits[:limit]

        try:
            return await self._on_store(search, busy="search")
        finally:
            self.queries += 1
            self.query_seconds += time.perf_counter() - started

    async def edges(self, entity_id: str | None, shard: int | list[int] | None, nodes: list[str], direction: str,
                    edge_types: list[str] | None, per_node: int) -> list[dict[str, Any]]:
        shards = self._shard_list(shard)

        def collect() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for s in self._candidate_shards(shards):
                found.extend(self.shards[s].edges(entity_id, nodes, direction, edge_types, per_node))
            return found

        return await self._on_store(collect)

    async def analytics(self, entity_id: str, shard: int, label: str, start_ms: int | None, end_ms: int | None,
                        bucket: str | None) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            if not self._candidate_shards([shard]):
                return self._empty_analytics(bucket)
            return self.shards[shard].analytics(entity_id, label, start_ms, end_ms, bucket)

        return await self._on_store(compute)

    @staticmethod
    def _empty_analytics(bucket: str | None) -> dict[str, Any]:
        empty: dict[str, Any] = {"count": 0, "sum": 0.0, "avg": None, "min": None, "max": None, "stddev": None}
        return {**empty, "buckets": []} if bucket else empty

    async def export_page(self, entity_id: str, shard: int, after_rowid: int, limit: int) -> list[dict[str, Any]]:
        def page() -> list[dict[str, Any]]:
            shards = self._candidate_shards([shard])
            return self.shards[shard].export_page(entity_id, after_rowid, limit) if shards else []

        return await self._on_store(page)

    async def erase(self, entity_id: str, shard: int | list[int] | None = None) -> dict[str, Any]:
        """Erase an entity from the given shards, or every shard here; per-shard counts of what was removed."""
        shards = self._shard_list(shard)
        async with self._writing(self._primaries() if shards is None else shards):
            return await self._erase(entity_id, shards)

    async def _erase(self, entity_id: str, shards: list[int] | None) -> dict[str, Any]:
        def erase_all() -> tuple[dict[str, Any], list[str]]:
            removed, free = {}, []
            for s in self._candidate_shards(shards):
                free += [m for (m,) in self.shards[s].db.execute("SELECT memory_id FROM memories WHERE entity_id = ?",
                                                                 (entity_id,)) if parse_memory_id(m).entity_prefix is None]
                counts = self.shards[s].erase(entity_id)
                if any(counts.values()):
                    removed[s] = counts
            return removed, free

        removed, free = await self._on_store(erase_all)
        await self.free_ids.forget_erased(free)
        return removed

    async def inspect(self, memory_id: str, shards: list[int] | None, include_window: bool, radius: int) -> dict | None:
        def find() -> dict | None:
            for s in self._candidate_shards(shards):
                store = self.shards[s]
                memory = store.get(memory_id)
                if memory is None:
                    continue
                if include_window:
                    memory["turn_window"] = store.turn_window(memory_id, radius)
                return {**memory, "shard": s, "node": self.name}
            return None

        return await self._on_store(find)

    async def delete_ids(self, pairs: list[tuple[str, int]]) -> int:
        """Delete each (memory_id, shard) in one store call; return how many were there."""
        async with self._writing(s for _, s in pairs):
            return await self._on_store(lambda: sum(self._shard(s).delete(m) for m, s in pairs))

    async def delete(self, memory_id: str, shards: list[int] | None) -> bool:
        def remove() -> bool:
            return any([self.shards[s].delete(memory_id) for s in self._candidate_shards(shards)])

        async with self._writing(self._primaries() if shards is None else shards):
            return await self._on_store(remove)

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
        return {self.placement.id_home(m) for m in ids}

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

    # ---- snapshots (node.snapshots) ----------------------------------------------------------------

    async def snapshot(self, shard: int, pin: str | None = None) -> dict[str, Any]:
        """Take a consistent copy of `shard` into this node's snapshot folder; its id, sequence
        number, size and sha256. Read it with `read_snapshot`, then `drop_snapshot`. With `pin`,
        the changes after the copy stay in the log (beyond `changelog_keep`) until that pin is
        released: it is set before the copy is taken, so at or below the copy's sequence number."""

        def open_and_pin() -> ShardStore:
            store = self._shard(shard)  # an empty shard is created: every shard has a copy
            if pin is not None:
                store.pin_log(pin, store.last_seq())
            return store

        store = await self._on_store(open_and_pin)
        return await self.snapshots.take(store, shard)

    async def read_snapshot(self, snapshot_id: str, offset: int, size: int) -> bytes:
        return await self.snapshots.read(snapshot_id, offset, size)

    async def drop_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.drop(snapshot_id)

    # ---- the change log and shard moves (node.moves) -------------------------------------------

    async def changes_since(self, shard: int, after: int, limit: int = 1000) -> list:
        """`shard`'s changes after sequence number `after`, oldest first (changelog.Change); if the
        log was trimmed past `after`, moves.LogTrimmed."""
        return await self.moves.changes_since(shard, after, limit)

    async def shard_seq(self, shard: int) -> int:
        """The sequence number of `shard`'s newest change."""
        return await self._on_store(lambda: self._shard(shard).last_seq())

    async def receive_shard(self, shard: int, source: str) -> dict[str, Any]:
        """Copy `shard` from node `source` (a snapshot, its index, the log after it) without
        owning it yet: {"shard", "seq", "bytes", "memories", "seconds", "copy_seconds", "index_seconds"}."""
        self.start()
        return await self.moves.receive(shard, source)

    async def fence(self, shard: int) -> int:
        """Refuse new writes to `shard` (NotOwnedError, retry), wait for those in flight; its last seq."""
        return await self.moves.fence(shard)

    async def catch_up(self, shard: int, source: str) -> int:
        """Apply what `source` wrote to `shard` since the copy (final once it is fenced); the seq reached."""
        return await self.moves.catch_up(shard, source)

    async def adopt(self, shard: int) -> None:
        """Own the received copy of `shard`: it is served here from now on (as the primary or a
        follower copy, as the placement says)."""
        await self.moves.adopt(shard)
        self.replication.sync(force=True)

    async def release(self, shard: int) -> None:
        """Drop `shard`, now owned elsewhere: requests for it raise NotOwnedError, its folder goes."""
        await self.moves.release(shard)

    async def abort_incoming(self, shard: int) -> None:
        """Undo `receive_shard`: delete the copy of `shard` received here (idempotent)."""
        await self.moves.abort(shard)

    async def unfence(self, shard: int) -> None:
        """Undo `fence`: writes to `shard` resume here, its move's log pin is released (idempotent)."""
        await self.moves.unfence(shard)

    async def set_placement(self, placement: Placement, down: tuple[str, ...] = ()) -> int:
        """Take a newer placement (a higher epoch; an older one is ignored) as this node's view of
        where shards live, and of which copies here are primaries (they replicate to the followers
        it names). It never changes which shards this node holds. `down`: nodes the authority
        finds silent; writes stop waiting for follower copies there at once (after a failover the
        old primary is such a follower) instead of after `replica_timeout_s`. Returns the epoch in use."""
        if placement.epoch > self.placement.epoch:
            self.placement = placement
            self._keep_placement()
            self.replication.sync()
        self.replication.mark_down(down)
        return self.placement.epoch

    def _keep_placement(self) -> None:
        """Keep the placement this node last saw on its own disk: a head that lost its disk rebuilds
        the cluster's from these copies (node.authority)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            placement_file.save(placement_file.node_copy(self.data_dir), self.placement)
        except OSError as exc:  # a full disk must not stop the node; the head's copy is the record
            log.warning("placement epoch %d not kept on %s: %s", self.placement.epoch, self.name, exc)

    async def settle(self, placement: Placement, moving: tuple[int, ...] = ()) -> dict[str, list[int]]:
        """Finish what an authority that stopped left here (a new one calls this once per node it
        finds running): take its placement if newer, own the received copies it names here, drop
        the others, lift the fences of moves it no longer drives (`moving`: the shards it is moving
        now), and release copies it no longer names here (a move flipped before the old copy went)."""
        await self.set_placement(placement)
        adopted, dropped, unfenced, released = [], [], [], []
        for shard, inc in list(self.moves.incoming.items()):
            if shard in moving or inc.pin != MOVE_PIN:  # a re-seed is the primary's, not the authority's
                continue
            if inc.store is not None and self.name in self.placement.replicas[shard]:
                await self.adopt(shard)
                adopted.append(shard)
            else:
                await self.abort_incoming(shard)
                dropped.append(shard)
        for shard in sorted(self.moves.gate.fenced - set(moving)):
            await self.unfence(shard)
            unfenced.append(shard)
        for shard in sorted(set(self.owned) - set(moving)):
            if self.name not in self.placement.replicas[shard]:
                await self.release(shard)
                released.append(shard)
        return {"adopted": adopted, "dropped": dropped, "unfenced": unfenced, "released": released}

    async def get_placement(self) -> Placement:
        return self.placement

    # ---- replicas (node.replication): the follower's side, health and status ----------------------

    async def apply_changes(self, shard: int, changes: list, from_node: str, after: int | None = None) -> int:
        """Apply the primary `from_node`'s changes to this follower copy of `shard`; its seq after.
        `after`: the seq the changes follow (default: the first one's - 1). A copy behind it (a
        gap) applies nothing and answers its own seq, so the primary sends again from there.
        NotOwnedError if there is no copy here or this node is the shard's primary in its view."""
        self.start()
        start = after if after is not None else (changes[0].seq - 1 if changes else 0)

        def apply() -> int:
            if shard not in self.owned:
                raise NotOwnedError(f"shard {shard} is not owned by {self.name}")
            if self.placement.owner[shard] == self.name:
                raise NotOwnedError(f"shard {shard}: {self.name} is its primary (placement epoch "
                                    f"{self.placement.epoch}), not a follower of {from_node}")
            store = self._shard(shard)
            if store.last_seq() < start:
                return store.last_seq()
            store.apply(changes)
            return store.last_seq()

        self.indexer.wrote()
        seq = await self._on_store(apply, busy="commit")
        self.indexer.committed()
        return seq

    async def copy_state(self, shard: int) -> tuple[int, str | None]:
        """(seq, digest of the change at seq or None) of the copy of `shard` here, for its primary
        to decide between sending it the changes it misses and re-seeding it; NotOwnedError if none."""

        def state() -> tuple[int, str | None]:
            if shard not in self.owned:
                raise NotOwnedError(f"shard {shard} is not owned by {self.name}")
            return self._shard(shard).copy_state()

        return await self._on_store(state)

    async def reseed(self, shard: int, source: str) -> int:
        """Replace the copy of `shard` here with one of the primary `source`'s (a snapshot and the
        log after it, as `receive_shard`) and keep it as a follower copy; its seq."""
        self.start()
        return await self.moves.reseed(shard, source)

    async def ping(self) -> dict[str, Any]:
        """A cheap answer for health checks (on the event loop, no store thread, no model)."""
        return {"node": self.name, "epoch": self.placement.epoch}

    async def replication_status(self) -> dict[str, Any]:
        """Per shard here: its role, seq, and for a primary each follower's acked seq, live flag and
        lag; and the node's counters (writes that waited for followers, followers marked down, re-seeds)."""

        def seqs() -> dict[int, int | None]:
            # A copy on disk that nothing opened since the start (no request, no push yet) still has a seq.
            return {s: self.shards[s].last_seq() if s in self.shards or self._exists(s) else None
                    for s in sorted(self.owned)}

        shards: dict[int, Any] = {}
        for s, seq in (await self._on_store(seqs)).items():
            entry: dict[str, Any] = {"role": "primary" if self.is_primary(s) else "follower", "seq": seq}
            if entry["role"] == "primary":
                entry["followers"] = {f: link.status(seq) for f, link in self.replication.links.get(s, {}).items()}
            shards[s] = entry
        return {"node": self.name, "placement_epoch": self.placement.epoch, "shards": shards,
                **self.replication.counters()}


    def _candidate_shards(self, shards: list[int] | None) -> list[int]:
        """Shards to look in: the given ones that exist here (primary or follower copies), or every
        open one this node is the primary of. A given shard not owned here (the caller's placement
        is stale, or it moved) is NotOwnedError, never an empty answer."""
        if shards is None:
            return sorted(s for s in self.shards if self.is_primary(s))
        for s in shards:
            if s not in self.owned:
                raise NotOwnedError(f"shard {s} is not owned by {self.name}")
        return [s for s in shards if s in self.shards or self._exists(s)]

    def _exists(self, shard: int) -> bool:
        if (shard_dir(self.data_dir, shard) / "store.sqlite3").exists():
            self._shard(shard)
            return True
        return False

    async def stats(self) -> dict[str, Any]:
        def collect() -> dict[str, Any]:
            per_shard = {s: {**store.stats(), "role": "primary" if self.is_primary(s) else "follower"}
                         for s, store in sorted(self.shards.items())}
            # Totals count primary copies only, so a cluster's sum over nodes counts each memory once.
            totals = {k: sum(v[k] for v in per_shard.values() if v["role"] == "primary") for k in STAT_KEYS}
            return {"node": self.name, "pid": os.getpid(), "shards_owned": len(self.owned), "shards_open": len(self.shards),
                    **totals, "bytes": sum(v["bytes"] for v in per_shard.values()), "per_shard": per_shard,
                    "embedder_passes": self.embedder.passes, "queries": self.queries,
                    "vector_cache": {"mb": round(self.vector_cache.bytes / 2**20, 1), "hits": self.vector_cache.hits,
                                     "misses": self.vector_cache.misses},
                    "vector_indexes": self.index_budget.stats(), "memory_bytes": own_memory_bytes(),
                    "query_seconds": round(self.query_seconds, 3),
                    "index_yielded_seconds": round(self.store_thread.yielded_seconds, 3),  # chunks waiting for searches
                    "busy_seconds": {"embed": round(self.embedder.busy_seconds, 3),
                                     **{k: round(v, 3) for k, v in self.store_thread.busy.items()}},
                    "group_commits": self.writer.group_commits, "grouped_writes": self.writer.grouped_writes,
                    "placement_epoch": self.placement.epoch, "moves": self.moves.state(),
                    "replication": {**self.replication.summary(), "lag_max": max(
                        (self.shards[s].last_seq() - link.acked for s, links in self.replication.links.items()
                         if s in self.shards for link in links.values() if link.acked is not None), default=0)}}

        return await self._on_store(collect)

    async def profile(self, entity_id: str, shard: int, recent: int) -> dict[str, Any] | None:
        def collect() -> dict[str, Any] | None:
            return self.shards[shard].profile(entity_id, recent) if self._candidate_shards([shard]) else None

        return await self._on_store(collect)

    async def close(self) -> None:
        """Finish in-flight writes, checkpoint every shard's WAL, release files."""
        self.replication.close()
        await self.writer.flush()
        await self.indexer.close()  # what is still unindexed is indexed by reconcile() at start-up
        await self.embedder.close()

        def close_all() -> None:
            for store in [*self.shards.values(), *(i.store for i in self.moves.incoming.values() if i.store)]:
                store.close()
            self.shards.clear()

        await self._on_store(close_all)
        self.store_thread.shutdown()

    async def walk(self, entity_id: str, shard: int, root: str, direction: str, edge_types: list[str] | None,
                   depth: int, breadth: int, max_edges: int, max_nodes: int) -> dict[str, Any]:
        """A graph walk within an entity's shard, every hop here: one Ray call, not one per hop."""
        from node.graph_walk import walk  # kept inside: this method is all the walk adds to Node

        return await walk(root, lambda frontier: self.edges(entity_id, shard, frontier, direction, edge_types,
                                                            breadth), depth, breadth, max_edges, max_nodes)
