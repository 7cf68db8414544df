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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from node.config import ClusterConfig, normalized_backend, resolve_model_path
from node.embedder import BatchingEmbedder, load_embedder
from node.ranking import RankingConfig
from node.shard_store import MemoryRecord, ShardStore
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
        self.data_dir = Path(config.data_dir)
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
        self._pending_writes: list[tuple[list[dict], list[MemoryRecord], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None
        self._indexer: asyncio.Task | None = None
        self._last_write = 0.0
        self.group_commits = 0  # store transactions' groups, and the writes they held (stats)
        self.grouped_writes = 0
        self.busy = {"commit": 0.0, "index": 0.0, "search": 0.0}  # store-thread seconds per kind of work
        self.queries = 0
        self.query_seconds = 0.0  # wall time of queries inside the node (embed, search and the hand-offs)
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
            store = ShardStore(
                shard_dir(self.data_dir, shard), shard, self.embedder.dimension,
                {"connectivity": h.connectivity, "ef_search": h.ef_search, "ef_construction": h.ef_construction},
                self.ranking, self.vector_cache,
            )
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

    async def ingest(self, items: list[dict[str, Any]]) -> list[str | None]:
        """Embed and store `items` (validated dicts with a `shard`); answer after the commit.

        Returns, per item, None when it was stored, or the id of the memory it duplicates when it
        asked for `enable_semantic_dedup` and one of its entity's memories (stored, or earlier in
        this call) has cosine >= `dedup_cosine` with it.
        """
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
        self._pending_writes.append((items, records, future))
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
                outcomes = await self._on_store(self._commit_group, [(items, records) for items, records, _ in group],
                                                busy="commit")
            except BaseException as exc:  # the executor itself failed: fail the whole group
                outcomes = [exc] * len(group)
            for (_, _, future), outcome in zip(group, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self.group_commits += 1
            self.grouped_writes += len(group)
            await self._index_backlogs(INDEX_BACKLOG)

    def _next_group(self) -> list[tuple[list[dict], list[MemoryRecord], asyncio.Future]]:
        """Take the next store-thread turn's writes, in arrival order: the first request, then more
        while the turn stays within COMMIT_ITEMS items and COMMIT_TEXT_CHARS characters. A request
        is never split (its shards' transactions stay all-or-nothing); the router's limits bound one."""
        items = chars = taken = 0
        for request, _, _ in self._pending_writes:
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

    def _commit_group(self, group: list[tuple[list[dict], list[MemoryRecord]]]) -> list[Any]:
        """Store every request of `group`, in arrival order (a later write of an id wins). One
        transaction per shard for the whole group; if it fails, each request is retried on its own
        so only the faulty one fails. Returns per request its dedup answers, or its exception."""
        answers: list[list[str | None]] = []
        accepted: list[MemoryRecord] = []
        by_shard: dict[int, list[MemoryRecord]] = {}
        for items, records in group:
            duplicate_of: list[str | None] = []
            for it, record in zip(items, records):
                dup = self._duplicate(record, it["shard"], accepted) if it.get("enable_semantic_dedup") else None
                duplicate_of.append(dup)
                if dup is None:
                    accepted.append(record)
                    by_shard.setdefault(it["shard"], []).append(record)
            answers.append(duplicate_of)
        try:
            for shard, batch in by_shard.items():
                self._shard(shard).upsert(batch)
            return answers
        except Exception:
            if len(group) == 1:
                raise
        outcomes: list[Any] = []
        for (items, records), duplicate_of in zip(group, answers):
            mine: dict[int, list[MemoryRecord]] = {}
            for it, record, dup in zip(items, records, duplicate_of):
                if dup is None:
                    mine.setdefault(it["shard"], []).append(record)
            try:
                for shard, batch in mine.items():
                    self._shard(shard).upsert(batch)
                outcomes.append(duplicate_of)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

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
                hits.sort(key=lambda h: (h["created_at_ms"], h["memory_id"]))
            else:
                hits.sort(key=lambda h: (-h["similarity"], -h["created_at_ms"], h["memory_id"]))
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

        def erase_all() -> dict[str, Any]:
            removed = {}
            for s in sorted(self.shards):
                counts = self.shards[s].erase(entity_id)
                if any(counts.values()):
                    removed[s] = counts
            return removed

        return await self._on_store(erase_all)

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

    async def delete(self, memory_id: str, shards: list[int] | None) -> bool:
        def remove() -> bool:
            return any([self.shards[s].delete(memory_id) for s in self._candidate_shards(shards)])

        return await self._on_store(remove)

    async def delete_elsewhere(self, pairs: list[tuple[str, int]]) -> int:
        """Delete each (memory_id, shard) id from every shard here but that one; return how many."""

        def remove() -> int:
            return sum(self.shards[s].delete(memory_id) for memory_id, keep in pairs
                       for s in sorted(self.shards) if s != keep)

        return await self._on_store(remove)

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
            return {"node": self.name, "shards_owned": len(self.owned), "shards_open": len(self.shards),
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


class NotOwnedError(LookupError):
    """A request reached a node that does not own the shard (stale placement)."""
