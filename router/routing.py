"""Where a request's work runs, and again until it succeeds: the router's placement cache, retries
and failover, in one place (Milvus's `ExecuteWithRetry`: callers pass only the work).

`execute(shard, work)` runs `work(node)` on the node of a shard; `everywhere(work)` runs
`work(node, shards)` on every node that is the primary of shards, with those shards (by this
router's placement: during a move each shard is asked of one node only). Both:
- send the work again after reading the placement each time a node answers that a shard moved
  (`Moved`: Redis Cluster's MOVED, without a client-side redirect) or is down, until the request's
  time is up (then 503 with Retry-After);
- for a read (`read=True`), ask a follower copy when the primary does not answer within
  `read_failover_s`, and when every copy is slow (a busy machine) but none is gone, wait for one;
- give an attempt up as soon as the authority has handed a silent node's shards to followers (a
  failover: `_watched`; one watch per router polls the authority while attempts wait long);
- while this router joins the cluster again (router.link), wait a little for it first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

from node.config import ClusterConfig
from node.control.placement import Placement
from node.records import ShardList
from router.control_client import ControlClient
from router.errors import ApiError, Unavailable
from router.link import Link
from router.node_client import Moved, NodeClient, NodeDown, Nodes, NodeSlow
from router.tuning import REJOIN_WAIT_S

log = logging.getLogger("tellodb")

T = TypeVar("T")
WATCH_S = 1.0  # an attempt waiting this long is checked against the authority's failovers, this often
Work = Callable[[NodeClient], Awaitable[T]]
PartWork = Callable[[NodeClient, list[int]], Awaitable[T]]
ShardWork = Callable[[NodeClient, int], Awaitable[T]]


class Routing:
    def __init__(self, config: ClusterConfig, link: Link, nodes: Nodes, control: ControlClient) -> None:
        self.config = config
        self.link = link
        self.nodes = nodes
        self.control = control
        self.placement = Placement(config.shards, tuple(config.node_names))
        self.moved_retries = 0  # requests sent again after a node said a shard moved
        self.read_failovers = 0  # reads answered by (or tried on) a follower copy
        self._refresh_lock = asyncio.Lock()
        self._waiting: set[_Waiting] = set()  # attempts in `_watched`
        self._watch: asyncio.Task | None = None  # the one watch of the authority's failovers, while attempts wait

    async def refresh_placement(self) -> Placement:
        """Read the placement again (a node said it does not own a shard); one read at a time. When
        the authority does not answer (the head is away) the cached placement stays."""
        async with self._refresh_lock:
            found = await self.control.placement()
            if found is not None and found.epoch > self.placement.epoch:
                for name in set(found.owner) - set(self.nodes):
                    await self.nodes.find(name)
                log.info("Placement refreshed epoch=%d (was %d)", found.epoch, self.placement.epoch)
                self.placement = found
            return self.placement

    async def execute(self, shard: int, work: Work[T], *, read: bool = False) -> T:
        """`work(node)` on the node of `shard` (its primary; for a read, a live copy), retried."""
        return await self._located(lambda _: shard, lambda node, _: work(node), read)

    async def for_entity(self, entity_id: str, work: ShardWork[T], *, read: bool = False) -> T:
        """`work(node, shard)` on the node of the entity's shard, the shard found again at every
        attempt: a split moves half of a shard's entities to a new one."""
        return await self._located(lambda p: p.shard_of(entity_id), work, read)

    async def for_home(self, memory_id: str, work: ShardWork[T], *, read: bool = False) -> T:
        """`work(node, shard)` on the node of a free-form id's home shard (node.id_homes), found again at every attempt."""
        return await self._located(lambda p: p.id_home(memory_id), work, read)

    async def _located(self, locate: Callable[[Placement], int], work: ShardWork[T], read: bool) -> T:
        async def attempt() -> T:
            shard = locate(self.placement)
            if read:
                return await self._read(shard, lambda node: work(node, shard))
            return await work(self.nodes[self.placement.node_of_shard(shard)], shard)

        return await self._retrying(attempt)

    async def everywhere(self, work: PartWork[T], *, shards: Callable[[], set[int]] | None = None, read: bool = False,
                         settle: Callable[[list[T | BaseException]], Awaitable[Any]] | None = None) -> list[T]:
        """`work(node, shards)` on every node with the shards it is the primary of (of `shards` only,
        when given: nodes without any are left alone), retried as one; the answers, one per call.
        For a read, the shards of a node that does not answer within
        `read_failover_s` are asked of their followers (a call per follower). `shards()` is asked
        at every attempt (after a split the shards are others). A write that must
        not half-succeed passes `settle`: each attempt's outcomes (an answer or the error, per
        node) go to it, and what it returns (or raises, then retried) is the result."""
        async def one(node: str, shards: list[int]) -> list[T]:
            if not read or not any(self.placement.followers(s) for s in shards):
                return [await work(self.nodes[node], shards)]
            try:
                return [await work(self.nodes[node].within(self.config.read_failover_s), shards)]
            except (NodeSlow, NodeDown):
                self.read_failovers += 1
                by_follower: dict[str, list[int]] = {}
                for s in shards:
                    if not self.placement.followers(s):
                        raise
                    by_follower.setdefault(self.placement.followers(s)[0], []).append(s)
                return await asyncio.gather(*(work(self.nodes[f], part) for f, part in by_follower.items()))

        async def attempt() -> Any:
            # Each list says how many shards this placement has: a node that knows of a split this
            # router does not (or the reverse) refuses it, and the attempt goes again (node.records.ShardList).
            of, wanted = self.placement.shards, None if shards is None else shards()
            by_node = {n: ShardList([s for s in mine if wanted is None or s in wanted], of)
                       for n, mine in self.placement.by_node().items()}
            calls = [one(n, mine) for n, mine in by_node.items() if mine]
            if settle is None:
                return [answer for part in await asyncio.gather(*calls) for answer in part]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            return await settle([o if isinstance(o, BaseException) else o[0] for o in outcomes])

        return await self._retrying(attempt)

    async def _read(self, shard: int, work: Work[T]) -> T:
        """A read of one shard: from its primary, or from a follower when the primary does not
        answer within `read_failover_s` (reads of moved shards follow the placement, as writes do)."""
        first, *others = self.placement.replicas[shard]
        if not others:
            return await work(self.nodes[first])
        failover_s = self.config.read_failover_s
        try:
            return await work(self.nodes[first].within(failover_s))
        except (NodeSlow, NodeDown) as exc:
            failure: ApiError = exc
        for node in others:
            self.read_failovers += 1
            try:
                return await work(self.nodes[node].within(failover_s))
            except (NodeSlow, NodeDown) as exc:
                failure = exc
        if isinstance(failure, NodeSlow):  # every copy is slow (a busy machine), none is gone: wait for one
            return await work(self.nodes[first].within(self.config.request_timeout_s / 2))
        raise failure

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt()` (which routes by the current placement) until it succeeds or the request's
        time is up: again after reading the placement each time a node answers that a shard moved
        or is down."""
        deadline = time.monotonic() + self.config.request_timeout_s
        delay = 0.01
        while True:
            if self.link.rejoining:
                try:
                    await asyncio.wait_for(self.link.joined.wait(),
                                           min(REJOIN_WAIT_S, max(0.01, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    raise Unavailable(f"this router is {self.link.not_ready()}; retry the request") from None
            try:
                return await self._watched(attempt(), deadline)
            except (Moved, NodeDown) as exc:
                if time.monotonic() + delay > deadline or self.control.authority is None:
                    raise Unavailable(f"{exc}; the placement changed, retry the request") from None
                self.moved_retries += 1
                await asyncio.sleep(delay)
                await self.refresh_placement()
                delay = min(delay * 2, 0.25)

    async def _watched(self, work: Awaitable[T], deadline: float) -> T:
        """Await `work` in the caller's own task (no task per request); while it waits, the router's
        one watch (`_watch_failovers`) may drop it with NodeDown, so it is made again elsewhere."""
        if self.control.authority is None:
            return await work
        task = asyncio.current_task()
        assert task is not None
        waiting = _Waiting(task, self.placement.epoch, time.monotonic(), deadline)
        self._waiting.add(waiting)
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch.done() or self._watch.get_loop() is not loop:  # (a loop's end ends it)
            self._watch = loop.create_task(self._watch_failovers())
        try:
            result = await work
        except asyncio.CancelledError:
            if waiting.dropped is None or task.uncancel() > 0:  # not ours, or cancelled by its caller too
                raise
            raise NodeDown(waiting.dropped) from None
        finally:
            self._waiting.discard(waiting)
        if waiting.dropped is not None:  # the work swallowed the drop and answered: its answer stands
            task.uncancel()
        return result

    async def _watch_failovers(self) -> None:
        """The router's one watch, while attempts wait: every WATCH_S, when one has waited that long,
        ask the authority whether a node is down and the placement moved on since the attempt
        began; if so drop it (cancel its task: `_watched` turns that into NodeDown, the way
        asyncio.timeout turns its cancel into TimeoutError). Ends when no attempt waits."""
        while self._waiting:
            await asyncio.sleep(WATCH_S)
            now = time.monotonic()
            due = [w for w in self._waiting if now - w.since >= WATCH_S and now < w.deadline]
            if not due or self.control.authority is None:
                continue
            summary = await self.control.summary(timeout=WATCH_S)
            if not summary or not summary["down"]:
                continue
            for w in due:
                if summary["epoch"] > w.epoch and w in self._waiting and w.dropped is None:
                    w.dropped = f"node {', '.join(summary['down'])} is down"
                    w.task.cancel()


class _Waiting:
    """An attempt waiting in `Routing._watched`: its task, the placement epoch it was routed by,
    since when it waits, its request's deadline, and why the watch dropped it (if it did)."""

    __slots__ = ("task", "epoch", "since", "deadline", "dropped")

    def __init__(self, task: asyncio.Task, epoch: int, since: float, deadline: float) -> None:
        self.task, self.epoch, self.since, self.deadline = task, epoch, since, deadline
        self.dropped: str | None = None
