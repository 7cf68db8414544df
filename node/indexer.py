"""The node's background indexer: vectors reach Chroma behind the writes (see node/store/vector_index.py).

A shard is indexed as soon as INDEX_BACKLOG of its rows wait (the writer asks after each of its
turns), and every waiting row once writes pause for INDEX_IDLE_S, in store calls of INDEX_CHUNK
rows, so queries queued meanwhile run between chunks. Searches come first (`_turn`): a chunk waits
for a gap in the searches and is small while queries arrive, until the backlog grows large. A pause after writes also trims each shard's
change log to its newest `changelog_keep` changes (node/store/changelog.py).

The pause watcher is a task started by `start()` (it needs the running event loop) and stopped by
`close()`. If it dies of an error it is started again: otherwise rows would wait unindexed (scored
exactly, slower) and logs untrimmed until the node's next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from node.store_thread import StoreThread
from node.tuning import (
    INDEX_BACKLOG,
    INDEX_IDLE_S,
    INDEX_CHUNK,
    INDEX_CHUNK_NEAR_SEARCHES,
    SEARCH_RECENT_S,
    SEARCH_GAP_S,
    INDEX_URGENT,
)

if TYPE_CHECKING:
    from node.store import ShardStore

log = logging.getLogger("tellodb.node")



class Indexer:
    def __init__(self, name: str, store_thread: StoreThread, shards: Callable[[], list[ShardStore]],
                 changelog_keep: int) -> None:
        self.name = name
        self.store_thread = store_thread
        self.shards = shards  # the open shards, read on the event loop
        self.changelog_keep = changelog_keep
        self.restarts = 0  # times the pause watcher died of an error and was started again
        self._task: asyncio.Task | None = None
        self._closed = False
        self._last_write = 0.0
        self._untrimmed = False  # commits since the change logs were last trimmed
        self._backlogs: asyncio.Task | None = None  # indexing full backlogs beside the writes

    def start(self) -> None:
        """Run the pause watcher, unless it runs already (idempotent; needs the running loop)."""
        if self._closed or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._watch_pauses())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if self._closed or task.cancelled():
            return
        error = task.exception()
        log.error("%s: the indexer stopped (%r); starting it again", self.name, error, exc_info=error)
        self.restarts += 1
        self.start()

    async def close(self) -> None:
        """Stop the pause watcher; what is still unindexed is indexed by reconcile() at start-up."""
        self._closed = True
        for task in (self._backlogs, self._task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except BaseException:  # cancelled, or it died of an error already (logged)
                    pass

    def wrote(self) -> None:
        """A write was queued: the pause starts over."""
        self._last_write = time.monotonic()

    def committed(self) -> None:
        """After a writer turn: index every full backlog now, before any pause, in a task of its
        own. The writer's next turn does not wait for it: commit turns and index chunks take the
        store thread in turns, so a write waits for one chunk, not for every shard's backlog."""
        self._untrimmed = True
        if self._backlogs is None or self._backlogs.done():
            self._backlogs = asyncio.get_running_loop().create_task(self.index_backlogs(INDEX_BACKLOG))

    async def settled(self) -> None:
        """Wait until the full backlogs found after the last writer turn are indexed."""
        while self._backlogs is not None and not self._backlogs.done():
            await asyncio.shield(self._backlogs)

    async def index_backlogs(self, at_least: int) -> None:
        """Index all waiting rows of every shard with `at_least` of them, INDEX_CHUNK rows per store
        call, so a query queued meanwhile waits for one chunk (tens of ms), not a whole backlog."""
        # Writes go on meanwhile: look again until no shard has `at_least` waiting. (shards() copies
        # the list in one step: the store thread may be opening a shard meanwhile.)
        while full := [store for store in self.shards() if store.unindexed >= at_least]:
            for store in full:
                try:
                    while store.unindexed:
                        chunk = await self._turn()
                        if not await self.store_thread.run(store.index_pending, chunk, busy="index"):
                            break
                except Exception:  # the rows stay searchable (scored exactly) and are retried later
                    log.exception("%s: indexing shard %d failed", self.name, store.shard_id)
                    return

    async def _turn(self) -> int:
        """Wait for this chunk's turn and return its size. Searches first while the node's backlog is
        modest: the chunk waits for a gap in the searches, and is small while queries arrive. A
        steady stream of queries can hold the index back until INDEX_URGENT rows wait (they are
        still found: searches score unindexed rows exactly); from there chunks of INDEX_CHUNK take
        turns with the searches, so the backlog stays below the TellodbIndexBacklogGrowing alert."""
        if sum(store.unindexed for store in self.shards()) >= INDEX_URGENT:
            return INDEX_CHUNK
        await self.store_thread.yield_to_searches(SEARCH_GAP_S)
        return INDEX_CHUNK_NEAR_SEARCHES if self.store_thread.searched_within(SEARCH_RECENT_S) else INDEX_CHUNK

    async def _watch_pauses(self) -> None:
        while True:
            await asyncio.sleep(INDEX_IDLE_S)
            if time.monotonic() - self._last_write >= INDEX_IDLE_S:
                await self.index_backlogs(1)
                if self._untrimmed:
                    self._untrimmed = False
                    await self.store_thread.run(self._trim_logs)

    def _trim_logs(self) -> None:
        """Keep each shard's change log to its newest `changelog_keep` changes (node/store/changelog.py)."""
        for store in self.shards():
            try:
                store.trim_log(self.changelog_keep)
            except Exception:  # a full disk, say: the log is trimmed on a later pause
                log.exception("%s: trimming the change log of shard %d failed", self.name, store.shard_id)
