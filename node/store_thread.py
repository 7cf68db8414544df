"""The node's one store thread: all SQLite and Chroma work runs here, one call at a time.

Shards are not thread-safe and SQLite writes serialise anyway, so one thread per node serves
writes, indexing and searches; the event loop only hands work over. `busy` adds up the thread's
seconds per kind of work (node stats).

Searches come first. Chroma holds the GIL for the whole of an upsert, so an index chunk that runs
while a query is being embedded or searched stalls the query for the chunk's length (30-90 ms for
64 vectors). The indexer therefore asks `yield_to_searches()` before each chunk: it waits until no
search has been in flight on this node (`searching()` marks one, from its arrival to its answer)
for a short gap, long enough that a client's next query is not already on its way.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable
from node.tuning import YIELD_POLL_S



class StoreThread:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-store")
        self.busy = {"commit": 0.0, "index": 0.0, "search": 0.0}  # store-thread seconds per kind of work
        self.searches = 0  # searches in flight on this node (embedding or searching)
        self.last_search = float("-inf")  # time.monotonic() when a search last ended
        self.yielded_seconds = 0.0  # time index chunks waited for searches

    @asynccontextmanager
    async def searching(self) -> AsyncIterator[None]:
        """Mark a search in flight, from its arrival (before embedding) to its answer."""
        self.searches += 1
        try:
            yield
        finally:
            self.searches -= 1
            self.last_search = time.monotonic()

    def searched_within(self, seconds: float) -> bool:
        return self.searches > 0 or time.monotonic() - self.last_search < seconds

    async def yield_to_searches(self, gap: float) -> None:
        """Wait until no search has been in flight here for `gap` seconds."""
        started = time.monotonic()
        while self.searches or time.monotonic() - self.last_search < gap:
            await asyncio.sleep(YIELD_POLL_S)
        self.yielded_seconds += time.monotonic() - started

    async def run(self, fn: Callable[..., Any], *args: Any, busy: str | None = None) -> Any:
        """Run `fn` on the store thread; with `busy`, add its run time to that kind of work."""
        if busy is None:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

        def timed():
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.busy[busy] += time.perf_counter() - started

        return await asyncio.get_running_loop().run_in_executor(self._pool, timed)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
