"""A node: the shards it owns and one batching embedder, behind an async API.

`Node` is plain Python so it can be tested without Ray; `node.actor.NodeActor` is the same class
as a Ray actor. All SQLite and Chroma work runs on one store thread per node (shards are not
thread-safe, and SQLite writes serialise anyway); embedding runs on its own thread. The event
loop only coordinates, so concurrent requests batch instead of queueing behind each other.

Vectors reach Chroma behind the writes (see `node.shard_store`): a shard is indexed as soon as
INDEX_BACKLOG of its rows wait, and every waiting row once writes pause for INDEX_IDLE_S, in
store calls of INDEX_CHUNK rows, so queries queued meanwhile run between chunks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from node import id_homes
from node.config import ClusterConfig, normalized_backend, resolve_model_path
from node.embedder import BatchingEmbedder, load_embedder
from node.errors import DeadlineExceeded, NotOwnedError, StorageFull, is_disk_full
from node.ids import parse_memory_id
from node.ranking import RankingConfig, best_first, oldest_first
from node.ring import Placement
from node.store import MemoryRecord, ShardStore, upsert_together
from node.vector_cache import VectorCache

log = logging.getLogger("tellodb.node")


INDEX_BACKLOG = 128  # unindexed rows that make a shard's Chroma batch worth its fixed cost now
INDEX_IDLE_S = 0.5  # a pause in writes this long indexes every backlog
INDEX_CHUNK = 64  # rows per store call when indexing, so queued queries get their turn between chunks
COMMIT_ITEMS = 1000  # writes per store-thread turn of the group commit (a larger single request still goes whole)
COMMIT_TEXT_CHARS = 512 * 1024  # and characters of text, so queued queries get their turn between groups

STAT_KEYS = ("memories", "entities", "facts_current", "facts_stale", "edges", "edges_valid", "measurements",
             "unindexed", "vectors")


def shard_dir(data_dir: str | Path, shard: int) -> Path:
    return Path(data_dir) / "shards" / f"{shard:04d}"


class Node:
    def __init__(self, name: str, config: ClusterConfig, shards: list[int], threads: int = 1) -> None:
        started = time.monotonic()
        self.name = name
        self.config = config
        self.owned = set(shards)
        self.placement = Placement(config.shards, tuple(config.node_names))
        self.data_dir = Path(config.data_dir)
        self._id_locks: dict[str, asyncio.Lock] = {}  # free-form ids being written or deleted (node.id_homes)
        self._peers: dict[str, Any] = {}
        self.ranking = RankingConfig.load(self.data_dir)
        self.embedder = BatchingEmbedder(
            load_embedder(resolve_model_path(config.embedding.model), normalized_backend(config),
                          config.embedding.device.lower(), threads, config.data_dir),
            max_batch=config.embedding.batch_size,
            max_wait_ms=config.embedding.max_wait_ms,
            max_chars=config.embedding.batch_chars,
        )
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-store")
        self.shards: dict[int, ShardStore] = {}
        self.vector_cache = VectorCache(config.vector_cache_mb << 20)
        self.reindexed = 0
        # (items, records, deadline, answer): writes waiting for the store thread
        self._pending_writes: list[tuple[list[dict], list[MemoryRecord], float | None, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self._indexer: asyncio.Task | None = None
        self._last_write = 0.0
        self.group_commits = 0  # store transactions' groups, and the writes they held (stats)
        self._trimmed_at = 0  # group_commits when the change logs were last trimmed
        self.grouped_writes = 0
        self.busy = {"commit": 0.0, "index": 0.0, "search": 0.0}  # store-thread seconds per kind of work
        self.queries = 0
        self.query_seconds = 0.0  # wall time of queries inside the node (embed, search and the hand-offs)
        shutil.rmtree(self._snapshot_folder(), ignore_errors=True)  # copies a crash left behind
        # Open the shards that exist on disk now (re-indexing what a crash left behind); the others
        # are created on their first write.
        for shard in sorted(self.owned):
            if (shard_dir(self.data_dir, shard) / "store.sqlite3").exists():
                self.reindexed += self._shard(shard).reconcile()
        self.startup_seconds = time.monotonic() - started

    # ---- helpers ------------------------------------------------------------------------------

    def _shard(self, shard: int) -> ShardStore:
        if shard not in self.owned:
            raise NotOwnedError(f"shard {shard} is not owned by {self.name}")
        store = self.shards.get(shard)
        if store is None:
            h = self.config.hnsw
            root = shard_dir(self.data_dir, shard)
            new = not root.exists()
            try:
                store = ShardStore(
                    root, shard, self.embedder.dimension,
                    {"connectivity": h.connectivity, "ef_search": h.ef_search, "ef_construction": h.ef_construction},
                    self.ranking, self.vector_cache,
                )
            except Exception as exc:
                if new:  # a shard created half-way (a full disk) must not look like one that exists
                    shutil.rmtree(root, ignore_errors=True)
                if is_disk_full(exc):
                    raise StorageFull(f"{self.name}: the data volume is full; shard {shard} cannot be created") from None
                raise
            self.shards[shard] = store
        return store

    async def _on_store(self, fn, *args, busy: str | None = None):
        """Run `fn` on the store thread; with `busy`, add its run time to that kind of work."""
        if busy is None:
            return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

        def timed():
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.busy[busy] += time.perf_counter() - started

        return await asyncio.get_running_loop().run_in_executor(self._store_pool, timed)

    # ---- API ----------------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        e = self.embedder.embedder
        return {
            "node": self.name,
            "pid": os.getpid(),
            "model": e.model_path,
            "dimension": e.dimension,
            "device": e.device,
            "backend": normalized_backend(self.config),
            "threads": e.threads,
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

    async def ingest(self, items: list[dict[str, Any]], deadline: float | None = None) -> list[str | None]:
        """Embed and store `items` (validated dicts with a `shard`); answer after the commit.

        Returns, per item, None when it was stored, or the id of the memory it duplicates when it
        asked for `enable_semantic_dedup` and one of its entity's memories (stored, or earlier in
        this call) has cosine >= `dedup_cosine` with it. A write whose commit would start after
        `deadline` (time.time()) is dropped with DeadlineExceeded: the caller has given up on it,
        and it must not land later. A volume below the free-space reserve: StorageFull.
        """
        self._check_space()
        vectors = await self.embedder.embed([it["textual_content"] for it in items])
        records: list[MemoryRecord] = []
        for it, vec in zip(items, vectors):
            records.append(MemoryRecord(
                memory_id=it["memory_id"],
                entity_id=it["entity_id"],
                session_id=it["session_id"],
                turn_index=it["turn_index"],
                created_at_ms=it["created_at_ms"],
                kind=it.get("kind"),
                textual_content=it["textual_content"],
                relations=tuple(tuple(r) for r in it.get("relations", ())),
                vector=vec,
                metrics=tuple((label, float(value)) for label, value in (it.get("metrics") or {}).items()),
                fact_key=it.get("fact_key"),
            ))

        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending_writes.append((items, records, deadline, future))
        self._last_write = time.monotonic()
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending())
        if self._indexer is None:
            self._indexer = loop.create_task(self._index_when_idle())
        return await future

    async def _write_pending(self) -> None:
        """Group commit: every write that queued while the store thread was busy goes into one
        transaction per shard. Each caller is answered after the commit that holds its data."""
        while self._pending_writes:
            group = self._next_group()
            try:
                outcomes = await self._on_store(self._commit_group, [w[:3] for w in group], busy="commit")
            except BaseException as exc:  # the executor itself failed: fail the whole group
                outcomes = [exc] * len(group)
            for (*_, future), outcome in zip(group, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self.group_commits += 1
            self.grouped_writes += len(group)
            await self._index_backlogs(INDEX_BACKLOG)

    def _next_group(self) -> list[tuple[list[dict], list[MemoryRecord], float | None, asyncio.Future]]:
        """Take the next store-thread turn's writes, in arrival order: the first request, then more
        while the turn stays within COMMIT_ITEMS items and COMMIT_TEXT_CHARS characters. A request
        is never split (its shards' transactions stay all-or-nothing); the router's limits bound one."""
        items = chars = taken = 0
        for request, *_ in self._pending_writes:
            size, text = len(request), sum(len(it["textual_content"]) for it in request)
            if taken and (items + size > COMMIT_ITEMS or chars + text > COMMIT_TEXT_CHARS):
                break
            items, chars, taken = items + size, chars + text, taken + 1
        group, self._pending_writes = self._pending_writes[:taken], self._pending_writes[taken:]
        return group

    async def _index_backlogs(self, at_least: int) -> None:
        """Index all waiting rows of every shard with `at_least` of them, INDEX_CHUNK rows per store
        call, so a query queued meanwhile waits for one chunk (tens of ms), not a whole backlog."""
        # list() copies in one step: the store thread may be opening a shard meanwhile.
        for store in [store for store in list(self.shards.values()) if store.unindexed >= at_least]:
            try:
                while store.unindexed:
                    if not await self._on_store(store.index_pending, INDEX_CHUNK, busy="index"):
                        break
            except Exception:  # the rows stay searchable (scored exactly) and are retried later
                log.exception("%s: indexing shard %d failed", self.name, store.shard_id)

    async def _index_when_idle(self) -> None:
        while True:
            await asyncio.sleep(INDEX_IDLE_S)
            if time.monotonic() - self._last_write >= INDEX_IDLE_S:
                await self._index_backlogs(1)
                if self._trimmed_at != self.group_commits:  # writes since the last trim
                    self._trimmed_at = self.group_commits
                    await self._on_store(self._trim_logs)

    def _trim_logs(self) -> None:
        """Keep each shard's change log to its newest `changelog_keep` changes (node.changelog)."""
        for store in list(self.shards.values()):
            try:
                store.trim_log(self.config.changelog_keep)
            except Exception:  # a full disk, say: the log is trimmed on a later pause
                log.exception("%s: trimming the change log of shard %d failed", self.name, store.shard_id)

    def _check_space(self) -> None:
        """Refuse writes while the data volume has less than `min_free_mb` free: a write that
        starts then has room to finish, so it never fails half-way for want of disk."""
        reserve = self.config.min_free_mb << 20
        if not reserve:
            return
        free = shutil.disk_usage(self.data_dir).free
        if free < reserve:
            raise StorageFull(f"{self.name}: {free >> 20} MiB free on the data volume, below the reserve of "
                              f"{self.config.min_free_mb} MiB (min_free_mb); writes resume when space is freed")

    def _commit_group(self, group: list[tuple[list[dict], list[MemoryRecord], float | None]]) -> list[Any]:
        """Store every request of `group`, in arrival order (a later write of an id wins). One
        transaction per shard for the whole group; if it fails, each request is retried on its own
        so only the faulty one fails, and a request is all-or-nothing across this node's shards
        (`upsert_together`). Returns per request its dedup answers, or its exception."""
        try:
            self._check_space()
        except StorageFull as exc:
            return [exc] * len(group)
        now = time.time()
        late = [deadline is not None and now >= deadline for _, _, deadline in group]
        answers: list[list[str | None]] = []
        accepted: list[MemoryRecord] = []
        by_shard: dict[int, list[MemoryRecord]] = {}
        for (items, records, _), expired in zip(group, late):
            if expired:
                answers.append([])
                continue
            duplicate_of: list[str | None] = []
            for it, record in zip(items, records):
                dup = self._duplicate(record, it["shard"], accepted) if it.get("enable_semantic_dedup") else None
                duplicate_of.append(dup)
                if dup is None:
                    accepted.append(record)
                    by_shard.setdefault(it["shard"], []).append(record)
            answers.append(duplicate_of)
        expired = DeadlineExceeded(f"{self.name}: the write reached its commit after the caller's deadline; "
                                   "it was not stored")
        try:
            self._upsert(by_shard)
            return [expired if x else a for a, x in zip(answers, late)]
        except Exception as exc:
            if len(group) - sum(late) == 1:
                return [expired if x else exc for x in late]
        outcomes: list[Any] = []
        for (items, records, _), duplicate_of, x in zip(group, answers, late):
            if x:
                outcomes.append(expired)
                continue
            mine: dict[int, list[MemoryRecord]] = {}
            for it, record, dup in zip(items, records, duplicate_of):
                if dup is None:
                    mine.setdefault(it["shard"], []).append(record)
            try:
                self._upsert(mine)
                outcomes.append(duplicate_of)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _upsert(self, by_shard: dict[int, list[MemoryRecord]]) -> None:
        """One unit of writes over this node's shards; a full disk becomes StorageFull."""
        try:
            upsert_together([(self._shard(shard), batch) for shard, batch in by_shard.items()])
        except Exception as exc:
            if is_disk_full(exc):
                raise StorageFull(f"{self.name}: the data volume is full; the write was not stored") from None
            raise

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

    async def query(self, text: str | None, entity_id: str | None, shard: int | None, limit: int,
                    window: tuple[int | None, int | None] | None = None) -> list[dict[str, Any]]:
        """Hits from one shard (an entity's) or from every shard here (`shard=None`), best first,
        created within `window` if given. Without `text`: the window's memories, oldest first."""
        started = time.perf_counter()
        vector = (await self.embedder.embed([text]))[0] if text is not None else None

        def search() -> list[dict[str, Any]]:
            hits: list[dict[str, Any]] = []
            for s in self._candidate_shards([shard] if shard is not None else None):
                store = self.shards[s]
                hits.extend(store.search(vector, text, entity_id, limit, window) if text is not None
                            else store.in_window(entity_id, window, limit))
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

    async def edges(self, entity_id: str | None, shard: int | None, nodes: list[str], direction: str,
                    edge_types: list[str] | None, per_node: int) -> list[dict[str, Any]]:
        def collect() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for s in self._candidate_shards([shard] if shard is not None else None):
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

    async def erase(self, entity_id: str) -> dict[str, Any]:
        """Erase an entity from every shard here; per-shard counts of what was removed."""

        def erase_all() -> tuple[dict[str, Any], list[str]]:
            removed, free = {}, []
            for s in sorted(self.shards):
                free += [m for (m,) in self.shards[s].db.execute("SELECT memory_id FROM memories WHERE entity_id = ?",
                                                                 (entity_id,)) if parse_memory_id(m).entity_prefix is None]
                counts = self.shards[s].erase(entity_id)
                if any(counts.values()):
                    removed[s] = counts
            return removed, free

        removed, free = await self._on_store(erase_all)
        by_home: dict[str, list[str]] = {}
        for m in free:  # their home records name the entity's shard: no trace may stay behind
            by_home.setdefault(self.placement.node_of_shard(self.placement.id_home(m)), []).append(m)
        await asyncio.gather(*(self._on_node(node, "forget_homes", ids) for node, ids in by_home.items()))
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
        return await self._on_store(lambda: sum(self._shard(s).delete(m) for m, s in pairs))

    async def delete(self, memory_id: str, shards: list[int] | None) -> bool:
        def remove() -> bool:
            return any([self.shards[s].delete(memory_id) for s in self._candidate_shards(shards)])

        return await self._on_store(remove)

    # ---- free-form ids (node.id_homes): this node is the home of the ids hashed to its shards ----

    def _home_store(self, memory_id: str) -> ShardStore:
        return self._shard(self.placement.id_home(memory_id))

    def _peer(self, node: str):
        """`node` as something to call: this object, or the other node's Ray actor."""
        if node == self.name:
            return None
        if node not in self._peers:
            import ray

            from node.actor import NAMESPACE, actor_name

            self._peers[node] = ray.get_actor(actor_name(node), namespace=NAMESPACE)
        return self._peers[node]

    async def _on_node(self, node: str, method: str, *args: Any) -> Any:
        peer = self._peer(node)
        return await (getattr(self, method)(*args) if peer is None else getattr(peer, method).remote(*args))

    async def _locked(self, ids: list[str]):
        """Hold the locks of `ids` (sorted, so two writers of overlapping ids never deadlock)."""
        locks = [self._id_locks.setdefault(m, asyncio.Lock()) for m in sorted(set(ids))]
        for lock in locks:
            await lock.acquire()
        return locks

    def _unlock(self, ids: list[str], locks: list[asyncio.Lock]) -> None:
        for lock in locks:
            lock.release()
        for m in set(ids):
            lock = self._id_locks.get(m)
            if lock is not None and not lock.locked() and not lock._waiters:
                del self._id_locks[m]

    async def _homes(self, ids: list[str]) -> dict[str, id_homes.Home]:
        def read() -> dict[str, id_homes.Home]:
            found: dict[str, id_homes.Home] = {}
            for m in ids:
                found.update(id_homes.lookup(self._home_store(m), [m]))
            return found

        return await self._on_store(read)

    async def _record_homes(self, homes: dict[str, id_homes.Home | None]) -> None:
        def write() -> None:
            for m, home in homes.items():
                if home is None:
                    id_homes.forget(self._home_store(m), [m])
                else:
                    id_homes.record(self._home_store(m), {m: home})

        await self._on_store(write)

    async def _holds(self, memory_id: str, shard: int) -> bool:
        return await self._on_node(self.placement.node_of_shard(shard), "inspect", memory_id, [shard], False, 0) \
            is not None

    async def _delete_at(self, memory_id: str, shard: int) -> bool:
        return await self._on_node(self.placement.node_of_shard(shard), "delete", memory_id, [shard])

    async def _settle(self, memory_id: str, home: id_homes.Home) -> id_homes.Home:
        """Finish a move a crash interrupted: keep the new copy if it was written, else the old."""
        if home.moving_from is None:
            return home
        if await self._holds(memory_id, home.shard):
            await self._delete_at(memory_id, home.moving_from)
            settled = id_homes.Home(home.shard, None)
        else:
            settled = id_homes.Home(home.moving_from, None)
        await self._record_homes({memory_id: settled})
        return settled

    async def ingest_free(self, items: list[dict[str, Any]], deadline: float | None = None) -> list[str | None]:
        """Write items whose free-form ids have their home here: each id ends up in exactly one
        shard, its item's, however many writers race (see node.id_homes). Answers as `ingest`."""
        ids = [it["memory_id"] for it in items]
        last = {it["memory_id"]: it for it in items}  # within one request the last write of an id wins
        locks = await self._locked(ids)
        try:
            homes = {m: await self._settle(m, h) for m, h in (await self._homes(list(last))).items()}
            intents = {m: id_homes.Home(it["shard"], homes[m].shard if m in homes and homes[m].shard != it["shard"]
                                        else None) for m, it in last.items()}
            await self._record_homes(intents)
            groups: dict[str, list[dict[str, Any]]] = {}
            for it in last.values():
                groups.setdefault(self.placement.node_of_shard(it["shard"]), []).append(it)
            try:
                parts = await asyncio.gather(*(self._on_node(node, "ingest", group, deadline)
                                               for node, group in groups.items()))
            except BaseException:
                # Nothing of a failed write is stored (a node's write is all-or-nothing): back to before.
                await self._record_homes({m: homes.get(m) for m in last})
                raise
            answer = {it["memory_id"]: dup for group, part in zip(groups.values(), parts) for it, dup in zip(group, part)}
            final: dict[str, id_homes.Home | None] = {}
            for m, intent in intents.items():
                if answer[m] is not None:  # a near-duplicate: not stored, the id stays where it was
                    final[m] = homes.get(m)
                    continue
                if intent.moving_from is not None:
                    await self._delete_at(m, intent.moving_from)
                final[m] = id_homes.Home(intent.shard, None)
            await self._record_homes(final)
            return [answer[m] for m in ids]
        finally:
            self._unlock(ids, locks)

    async def inspect_free(self, memory_id: str, include_window: bool, radius: int) -> dict | None:
        home = (await self._homes([memory_id])).get(memory_id)
        if home is None:
            return None
        for shard in (home.shard, home.moving_from):
            if shard is not None:
                found = await self._on_node(self.placement.node_of_shard(shard), "inspect", memory_id, [shard],
                                            include_window, radius)
                if found is not None:
                    return found
        return None

    async def delete_free(self, memory_id: str) -> bool:
        locks = await self._locked([memory_id])
        try:
            home = (await self._homes([memory_id])).get(memory_id)
            if home is None:
                return False
            deleted = [await self._delete_at(memory_id, s) for s in (home.shard, home.moving_from) if s is not None]
            await self._record_homes({memory_id: None})
            return any(deleted)
        finally:
            self._unlock([memory_id], locks)

    async def forget_homes(self, ids: list[str]) -> None:
        """Drop the home records of an erased entity's free-form ids, and their log entries."""
        await self._on_store(lambda: [id_homes.forget(self._home_store(m), [m], erased=True) for m in ids])

    async def unregistered_free_ids(self) -> dict[int, list[str]]:
        """Per shard here that predates id homes: its free-form ids (to register at their homes)."""

        def collect() -> dict[int, list[str]]:
            found: dict[int, list[str]] = {}
            for s in sorted(self.owned):
                if not self._candidate_shards([s]) or self.shards[s].meta("id_homes") is not None:
                    continue
                found[s] = [m for (m,) in self.shards[s].db.execute("SELECT memory_id FROM memories")
                            if parse_memory_id(m).entity_prefix is None]
            return found

        return await self._on_store(collect)

    async def register_homes(self, pairs: list[tuple[str, int]]) -> None:
        """Record the shard of free-form ids found in old shards, unless the id already has a home."""

        def write() -> None:
            for m, shard in pairs:
                store = self._home_store(m)
                if not id_homes.lookup(store, [m]):
                    id_homes.record(store, {m: id_homes.Home(shard, None)})

        await self._on_store(write)

    async def mark_homes_registered(self, shards: list[int]) -> None:
        await self._on_store(lambda: [self._shard(s).set_meta("id_homes", "1") for s in shards])

    # ---- snapshots: a shard's bytes leave through Ray, a chunk per call (never a shared filesystem) ----

    async def snapshot(self, shard: int) -> dict[str, Any]:
        """Take a consistent copy of `shard` (node.shard_store.ShardStore.snapshot) into this node's
        snapshot folder, off the store thread (the shard keeps serving); its id, sequence number,
        size and sha256. Read it with `read_snapshot`, then `drop_snapshot`."""
        store = await self._on_store(self._shard, shard)  # an empty shard is created: every shard has a copy
        folder = self._snapshot_folder()
        folder.mkdir(parents=True, exist_ok=True)
        snapshot_id = f"{shard:04d}-{os.urandom(8).hex()}"
        info = await asyncio.get_running_loop().run_in_executor(None, store.snapshot, folder / snapshot_id)
        return {**info, "id": snapshot_id, "node": self.name}

    def _snapshot_folder(self) -> Path:
        return self.data_dir / "snapshots" / self.name

    def _snapshot_path(self, snapshot_id: str) -> Path:
        if not snapshot_id.replace("-", "").isalnum():
            raise ValueError(f"bad snapshot id {snapshot_id!r}")
        return self._snapshot_folder() / snapshot_id

    async def read_snapshot(self, snapshot_id: str, offset: int, size: int) -> bytes:
        def read() -> bytes:
            with open(self._snapshot_path(snapshot_id), "rb") as f:
                f.seek(offset)
                return f.read(size)

        return await asyncio.get_running_loop().run_in_executor(None, read)

    async def drop_snapshot(self, snapshot_id: str) -> None:
        self._snapshot_path(snapshot_id).unlink(missing_ok=True)

    def _candidate_shards(self, shards: list[int] | None) -> list[int]:
        """Shards to look in: the given ones that exist here, or every open one."""
        if shards is None:
            return sorted(self.shards)
        return [s for s in shards if s in self.owned and (s in self.shards or self._exists(s))]

    def _exists(self, shard: int) -> bool:
        if (shard_dir(self.data_dir, shard) / "store.sqlite3").exists():
            self._shard(shard)
            return True
        return False

    async def stats(self) -> dict[str, Any]:
        def collect() -> dict[str, Any]:
            per_shard = {s: store.stats() for s, store in sorted(self.shards.items())}
            totals = {k: sum(v[k] for v in per_shard.values()) for k in STAT_KEYS}
            return {"node": self.name, "pid": os.getpid(), "shards_owned": len(self.owned), "shards_open": len(self.shards),
                    **totals, "per_shard": per_shard, "embedder_passes": self.embedder.passes, "queries": self.queries,
                    "vector_cache": {"mb": round(self.vector_cache.bytes / 2**20, 1), "hits": self.vector_cache.hits,
                                     "misses": self.vector_cache.misses},
                    "query_seconds": round(self.query_seconds, 3),
                    "busy_seconds": {"embed": round(self.embedder.busy_seconds, 3),
                                     **{k: round(v, 3) for k, v in self.busy.items()}},
                    "group_commits": self.group_commits, "grouped_writes": self.grouped_writes}

        return await self._on_store(collect)

    async def profile(self, entity_id: str, shard: int, recent: int) -> dict[str, Any] | None:
        def collect() -> dict[str, Any] | None:
            return self.shards[shard].profile(entity_id, recent) if self._candidate_shards([shard]) else None

        return await self._on_store(collect)

    async def close(self) -> None:
        """Finish in-flight work, checkpoint every shard's WAL, release files."""
        if self._writer is not None:
            await self._writer
        if self._indexer is not None:  # what is still unindexed is indexed by reconcile() at start-up
            self._indexer.cancel()
            try:
                await self._indexer
            except asyncio.CancelledError:
                pass
        await self.embedder.close()

        def close_all() -> None:
            for store in self.shards.values():
                store.close()
            self.shards.clear()

        await self._on_store(close_all)
        self._store_pool.shutdown(wait=True)
