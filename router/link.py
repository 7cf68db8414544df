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
from typing import Any

import ray

from node.names import NAMESPACE


class Lost(Exception):
    """This router lost the cluster while a call waited on it."""


class Link:
    def __init__(self) -> None:
        self.rejoining: str | None = None  # why this router is joining the cluster again, while it does
        self.authority_up = True  # the authority answered the last check
        self.joined = asyncio.Event()
        self.joined.set()
        self._lost: asyncio.Future | None = None  # set when this router loses the cluster
        self._lookups = ThreadPoolExecutor(4, thread_name_prefix="tellodb-lookup")

    def lose(self, reason: str) -> None:
        """The cluster is lost: calls waiting on it give up now, new ones wait for `rejoined`."""
        self.rejoining = reason
        self.joined.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def not_ready(self) -> str | None:
        """Why this router cannot route now: only while it joins the cluster again."""
        return f"joining the cluster again ({self.rejoining})" if self.rejoining else None

    def rejoined(self) -> None:
        self.rejoining = None
        self.joined.set()

    async def answer(self, call: Any, timeout: float) -> Any:
        """Await a Ray call for at most `timeout` (asyncio.TimeoutError), or until this router loses
        the cluster (Lost)."""
        lost = self._lost
        if lost is None or lost.done():
            lost = self._lost = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if lost in done:
            raise Lost()
        raise asyncio.TimeoutError()

    async def lookup(self, name: str, timeout: float = 3.0) -> Any:
        """A named actor's handle, or None (not there, or the head does not answer in time). On a
        few threads of its own: a look-up the head does not answer can take long to give up."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._lookups, ray.get_actor, name, NAMESPACE), timeout)
        except Exception:
            return None
