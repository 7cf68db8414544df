"""This router's hold on the cluster, shared by its node calls, its routing and its authority client.

The head may go away (router.membership): requests go on from the cached placement meanwhile, and
`authority_up` says whether the authority answered the last check. When the head comes back as a
new Ray cluster the router joins it again (router.cluster.Cluster.watch): while it does
(`rejoining`) node calls fail at once, requests wait for `joined` a little, and calls already
waiting on the old cluster, whose answers never come, give up (`answer`).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, TypeVar

import ray

from node.names import NAMESPACE


T = TypeVar("T")


class Lost(Exception):
    """This router lost the cluster while a call waited on it."""


class Link:
    def __init__(self) -> None:
        self.rejoining: str | None = None  # why this router is joining the cluster again, while it does
        self.authority_up = True  # the authority answered the last check
        self.joined = asyncio.Event()
        self.joined.set()
        self._waiting: set[_Waiting] = set()  # calls waiting in `answer`
        self._lookups = ThreadPoolExecutor(4, thread_name_prefix="tellodb-lookup")
        self._looking = 0  # look-ups running in `_lookups` (each inside Ray's driver)

    def lose(self, reason: str) -> None:
        """The cluster is lost: calls waiting on it give up now, new ones wait for `rejoined`."""
        self.rejoining = reason
        self.joined.clear()
        for waiting in self._waiting:
            if not waiting.lost:
                waiting.lost = True
                waiting.task.cancel()

    def not_ready(self) -> str | None:
        """Why this router cannot route now: only while it joins the cluster again."""
        return f"joining the cluster again ({self.rejoining})" if self.rejoining else None

    def rejoined(self) -> None:
        self.rejoining = None
        self.joined.set()

    async def answer(self, call: Awaitable[T], timeout: float) -> T:
        """Await a Ray call for at most `timeout` (asyncio.TimeoutError), or until this router loses
        the cluster (Lost). In the caller's own task, no task per call: `lose` cancels the tasks
        waiting here, and that cancel is turned into Lost (as asyncio.timeout turns its own into
        TimeoutError)."""
        task = asyncio.current_task()
        assert task is not None
        waiting = _Waiting(task)
        self._waiting.add(waiting)
        try:
            async with asyncio.timeout(timeout):
                return await call
        except asyncio.CancelledError:
            if not waiting.lost or task.uncancel() > 0:  # not ours, or cancelled by its caller too
                raise
            raise Lost() from None
        finally:
            self._waiting.discard(waiting)

    async def lookup(self, name: str, timeout: float = 3.0) -> Any:
        """A named actor's handle, or None (not there, the head does not answer in time, or this
        router is joining again). On a few threads of its own: a look-up the head does not answer
        can take long to give up."""
        if self.rejoining:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._lookups, self._get_actor, name), timeout)
        except Exception:
            return None

    def _get_actor(self, name: str) -> Any:
        self._looking += 1
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        finally:
            self._looking -= 1

    async def lookups_done(self, timeout: float) -> None:
        """Wait (at most `timeout`) until no look-up runs in Ray's driver: it is about to be shut down,
        and a thread still inside it then ends the whole process (Ray: "the core worker has already
        been shutdown... The process will exit")."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._looking and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)


class _Waiting:
    """A call waiting in `Link.answer`: its caller's task, and whether `lose` cancelled it."""

    __slots__ = ("task", "lost")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.lost = False
