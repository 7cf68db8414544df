"""The node's one store thread: all SQLite and Chroma work runs here, one call at a time.

Shards are not thread-safe and SQLite writes serialise anyway, so one thread per node serves
writes, indexing and searches; the event loop only hands work over. `busy` adds up the thread's
seconds per kind of work (node stats).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class StoreThread:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-store")
        self.busy = {"commit": 0.0, "index": 0.0, "search": 0.0}  # store-thread seconds per kind of work

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
