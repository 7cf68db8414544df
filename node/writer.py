"""The node's group-commit writer: concurrent writes share store-thread turns and transactions.

Every write that queues while the store thread is busy goes into the next turn, one transaction
per shard for the whole turn, and each caller is answered after the commit that holds its data.
A turn holds at most COMMIT_ITEMS items and COMMIT_TEXT_CHARS characters (a larger single request
still goes whole), so queued queries get their turn between groups. A write whose commit would
start after its deadline is dropped (DeadlineExceeded), and writes are refused while the data
volume is below its free-space reserve (StorageFull), so none fails half-way for want of disk.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from node.errors import DeadlineExceeded, StorageFull, is_disk_full
from node.indexer import Indexer
from node.records import IngestItem
from node.store_thread import StoreThread
from node.tuning import COMMIT_ITEMS, COMMIT_TEXT_CHARS

if TYPE_CHECKING:
    from node.store import MemoryRecord


# (items, records, deadline, answer): a write waiting for the store thread
Pending = tuple[list[IngestItem], list["MemoryRecord"], "float | None", asyncio.Future]


class GroupWriter:
    """`commit(by_shard)` stores {shard: records} as one unit (on the store thread);
    `duplicate(record, shard, earlier)` names the memory a record nearly repeats, if any."""

    def __init__(self, name: str, data_dir: Path, min_free_mb: int, store_thread: StoreThread, indexer: Indexer,
                 commit: Callable[[dict[int, list[MemoryRecord]]], None],
                 duplicate: Callable[[MemoryRecord, int, list[MemoryRecord]], str | None]) -> None:
        self.name = name
        self.data_dir = data_dir
        self.min_free_mb = min_free_mb
        self.store_thread = store_thread
        self.indexer = indexer
        self.commit = commit
        self.duplicate = duplicate
        self.group_commits = 0  # store transactions' groups, and the writes they held (stats)
        self.grouped_writes = 0
        self._pending: list[Pending] = []
        self._task: asyncio.Task | None = None

    async def write(self, items: list[IngestItem], records: list[MemoryRecord], deadline: float | None) -> list[str | None]:
        """Queue one request's records; its dedup answers once committed (or its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((items, records, deadline, future))
        self.indexer.wrote()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._write_pending())
        return await future

    async def flush(self) -> None:
        """Wait until every queued write is committed (and full backlogs indexed)."""
        if self._task is not None:
            await self._task
        await self.indexer.settled()

    def check_space(self) -> None:
        """Refuse writes while the data volume has less than `min_free_mb` free: a write that
        starts then has room to finish, so it never fails half-way for want of disk."""
        reserve = self.min_free_mb << 20
        if not reserve:
            return
        free = shutil.disk_usage(self.data_dir).free
        if free < reserve:
            raise StorageFull(f"{self.name}: {free >> 20} MiB free on the data volume, below the reserve of "
                              f"{self.min_free_mb} MiB (min_free_mb); writes resume when space is freed")

    async def _write_pending(self) -> None:
        while self._pending:
            group = self._next_group()
            try:
                outcomes = await self.store_thread.run(self._commit_group, [w[:3] for w in group], busy="commit")
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
            self.indexer.committed()

    def _next_group(self) -> list[Pending]:
        """Take the next store-thread turn's writes, in arrival order: the first request, then more
        while the turn stays within COMMIT_ITEMS items and COMMIT_TEXT_CHARS characters. A request
        is never split (its shards' transactions stay all-or-nothing); the router's limits bound one."""
        items = chars = taken = 0
        for request, *_ in self._pending:
            size, text = len(request), sum(len(it.textual_content) for it in request)
            if taken and (items + size > COMMIT_ITEMS or chars + text > COMMIT_TEXT_CHARS):
                break
            items, chars, taken = items + size, chars + text, taken + 1
        group, self._pending = self._pending[:taken], self._pending[taken:]
        return group

    def _commit_group(self, group: list[tuple[list[IngestItem], list[MemoryRecord], float | None]]) -> list[Any]:
        """Store every request of `group`, in arrival order (a later write of an id wins). One
        transaction per shard for the whole group; if it fails, each request is retried on its own
        so only the faulty one fails, and a request is all-or-nothing across this node's shards.
        Returns per request its dedup answers, or its exception."""
        try:
            self.check_space()
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
                dup = self.duplicate(record, it.shard, accepted) if it.enable_semantic_dedup else None
                duplicate_of.append(dup)
                if dup is None:
                    accepted.append(record)
                    by_shard.setdefault(it.shard, []).append(record)
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
                    mine.setdefault(it.shard, []).append(record)
            try:
                self._upsert(mine)
                outcomes.append(duplicate_of)
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _upsert(self, by_shard: dict[int, list[MemoryRecord]]) -> None:
        """One unit of writes over this node's shards; a full disk becomes StorageFull."""
        try:
            self.commit(by_shard)
        except Exception as exc:
            if is_disk_full(exc):
                raise StorageFull(f"{self.name}: the data volume is full; the write was not stored") from None
            raise
