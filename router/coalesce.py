"""Merge concurrent requests for one node into one Ray call.

Every Ray actor call costs about a millisecond of CPU between the router and the node, as much as
storing a memory, and under load the engine gets hundreds of single ingests and queries a second.
A `Coalescer` sends a node's first request at once; while `max_in_flight` calls are out, new
requests queue, and when one comes back everything queued goes in the next call (at most
`max_calls`). Nothing waits on a timer: when idle a request costs the same as before, under load
one Ray call carries many. A request that goes at once is sent from its caller's own task (no task
of its own, fewer turns of the event loop: loadtest/hops.py); a call counts as out until Ray
answers it, even when its caller gave up first. The node runs the merged requests concurrently
(`Node.many`), so they still share embedding passes and group commits, and each gets its own
result or its own error.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

Send = Callable[[list[tuple]], Awaitable[list[Any]]]


class Coalescer:
    def __init__(self, send: Send, max_in_flight: int = 4, max_calls: int = 64) -> None:
        self._send = send
        self.max_in_flight = max_in_flight
        self.max_calls = max_calls
        self._queued: list[tuple[tuple, asyncio.Future]] = []
        self._in_flight = 0
        self.calls = 0  # Ray calls made and requests they carried, for stats
        self.requests = 0

    async def call(self, args: tuple) -> Any:
        """The result of one request (its arguments); raises the error that request alone got."""
        if not self._queued and self._in_flight < self.max_in_flight:
            return await self._alone(args)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queued.append((args, future))
        self._pump()
        return await future

    async def _alone(self, args: tuple) -> Any:
        """One request in a call of its own, awaited here. Its slot is taken until Ray answers, even
        when this caller is cancelled first (a timeout): `shield` keeps the call's own future."""
        self.calls += 1
        self.requests += 1
        self._in_flight += 1
        try:
            answer = asyncio.ensure_future(self._send([args]))
        except BaseException:
            self._done()
            raise
        answer.add_done_callback(self._done)
        [result] = await asyncio.shield(answer)
        if isinstance(result, BaseException):
            raise result
        return result

    def _done(self, _: Any = None) -> None:
        self._in_flight -= 1
        self._pump()

    def _pump(self) -> None:
        while self._queued and self._in_flight < self.max_in_flight:
            batch, self._queued = self._queued[: self.max_calls], self._queued[self.max_calls:]
            self._in_flight += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[tuple, asyncio.Future]]) -> None:
        self.calls += 1
        self.requests += len(batch)
        try:
            results = await self._send([args for args, _ in batch])
        except BaseException as exc:  # the Ray call itself failed: every request in it gets the error
            results = [exc] * len(batch)
        finally:
            self._in_flight -= 1
        for (_, future), result in zip(batch, results):
            if future.done():  # its caller gave up (timeout)
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._pump()
