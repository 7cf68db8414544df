"""The router's client of the control plane: the placement authority (node.control.authority) and the
cluster's shape as operators see it (`tellodb cluster status | add-node | remove-node`).

The authority's handle is looked up again by name when it stops answering (a restarted head runs
a new one: `find_authority`); meanwhile member changes answer 503 and requests go on from the
cached placement (router.routing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.exceptions import RayError, RayTaskError

from node.control.authority import NotReady, PlacementError, UnknownNode
from node.names import AUTHORITY_NAME
from node.config import ClusterConfig
from node.control.placement import Placement
from router.errors import ApiError, Conflict, NotFound, Unavailable
from router.link import Link
from router.node_client import Nodes

log = logging.getLogger("tellodb")


class ControlClient:
    def __init__(self, config: ClusterConfig, link: Link, nodes: Nodes) -> None:
        self.config = config
        self.link = link
        self.nodes = nodes
        self.authority: Any = None  # the placement authority's actor handle
        self.membership: Any = None  # router.membership.Membership of a `tellodb router`
        self._finding = False  # the authority is being looked up again
        self._summary_cache: tuple[float, dict | None] = (0.0, None)

    async def find_authority(self) -> None:
        """Look the authority up again by name (a restarted head runs a new one), when the head answers."""
        if self._finding or (self.membership is not None
                             and not await asyncio.to_thread(self.membership.head_answers)):
            return
        self._finding = True
        try:
            found = await self.link.lookup(AUTHORITY_NAME)
        finally:
            self._finding = False
        if found is not None and (self.authority is None or found._actor_id != self.authority._actor_id):
            log.info("Placement authority found again")
            self.authority = found

    async def placement(self, timeout: float = 2.0) -> Placement | None:
        """The authority's placement, or None when it does not answer (the head is away)."""
        try:
            found = await asyncio.wait_for(self.authority.placement.remote(), timeout)
        except Exception as exc:
            self.link.authority_up = False
            log.debug("placement not refreshed: %s", exc)
            await self.find_authority()
            return None
        self.link.authority_up = True
        return found

    async def summary(self, timeout: float, max_age_s: float = 0.5) -> dict[str, Any] | None:
        """Epoch, pending moves, nodes down, the last error (read at most every `max_age_s`, since
        every slow request asks); None when the authority does not answer."""
        cached_at, cached = self._summary_cache
        if cached is not None and time.monotonic() - cached_at < max_age_s:
            return cached
        try:
            found = await asyncio.wait_for(self.authority.summary.remote(), timeout)
        except Exception:
            return None
        self._summary_cache = (time.monotonic(), found)
        return found

    def forget_summary(self) -> None:
        self._summary_cache = (0.0, None)

    async def _ask_authority(self, method: str, *args: Any) -> Any:
        if self.link.rejoining:
            raise Unavailable(f"the placement authority cannot be asked now: this router is {self.link.not_ready()}")
        if not self.link.authority_up:
            raise Unavailable("the placement authority does not answer (is `tellodb head` running?); moves and "
                              "member changes wait for it")
        try:
            return await asyncio.wait_for(getattr(self.authority, method).remote(*args), self.config.request_timeout_s)
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, NotReady):
                raise Unavailable(str(cause)) from None
            if isinstance(cause, UnknownNode):
                raise NotFound(str(cause)) from None
            if isinstance(cause, PlacementError):
                raise Conflict(str(cause)) from None
            raise ApiError(f"the placement authority could not complete {method}") from None
        except (asyncio.TimeoutError, RayError):
            self.link.authority_up = False
            await self.find_authority()
            raise Unavailable("the placement authority did not answer (is `tellodb head` running?); moves and "
                              "member changes wait for it") from None

    async def cluster_status(self) -> dict[str, Any]:
        """The authority's view (members, owners, moves, each shard's copies with their state, seqs
        and lag: `shards_detail`, `under_replicated`) with each node's memories and bytes."""
        status = await self._ask_authority("status")
        per_node = await self.stats(timeout=10)
        for name, member in status["members"].items():
            stats = per_node.get(name)
            if stats is None and name not in self.nodes and member["joined"]:
                self.nodes.reresolve(name)
            if stats is not None:
                member.update(memories=stats["memories"], answered=True,
                              bytes=sum(s.get("bytes", 0) for s in stats["per_shard"].values()))
            else:
                member["answered"] = False
        return status

    async def add_node(self, name: str) -> dict[str, Any]:
        return await self._ask_authority("add_node", name)

    async def remove_node(self, name: str) -> dict[str, Any]:
        return await self._ask_authority("remove_node", name)

    async def rebalance(self) -> dict[str, Any]:
        return await self._ask_authority("rebalance")

    async def split(self, shard: int | None) -> dict[str, Any]:
        return await self._ask_authority("split", shard)

    async def stats(self, timeout: float | None = None) -> dict[str, dict | None]:
        """Per-node stats; a node that does not answer within `timeout` maps to None."""

        async def one(node: str) -> dict | None:
            try:
                return await asyncio.wait_for(self.nodes[node].stats(), timeout)
            except (Unavailable, asyncio.TimeoutError):
                return None

        names = list(self.nodes)
        return dict(zip(names, await asyncio.gather(*(one(n) for n in names))))
