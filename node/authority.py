"""The placement authority: the cluster's one record of which node owns which shard, at which epoch.

One Ray actor (`AUTHORITY_NAME`), started by `tellodb head` on the head machine (and by
`tellodb serve` inside its own tree), keeps the placement in `<data_dir>/placement.json`, so it
survives a restart of the head, and changes it only here:

- members: `add_node` / `remove_node` change who should own shards; the shards then travel one
  at a time to where the consistent-hash ring puts them (`Placement.moves`), so about 1/N of
  them move on an add, and a removed node's shards spread over the others;
- a move (`_move`) copies the shard while both copies serve nothing new: the target pulls a
  snapshot and the change log after it (node.moves), the source fences writes to that shard
  alone, the target applies the last changes, the owner flips at a new epoch and is saved before
  anyone is told, and only then does the source delete its copy. A failure before the flip rolls
  back (the target's copy dropped, the source unfenced) and is reported; the flip is the one
  point of no return, so a shard always has exactly one owner.

Nodes register when their `tellodb node` process starts (`join`), routers read the placement
(`placement`) and read it again when a node answers that it does not own a shard (Redis
Cluster's MOVED). Nodes get each new placement pushed, for the ids they look up on other nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.ring import Placement

log = logging.getLogger("tellodb")

AUTHORITY_NAME = "tellodb-placement"
HISTORY = 50  # finished and failed moves kept for `status`


class PlacementError(NodeError):
    """A request to change the cluster that cannot be done as asked (the router answers 409)."""


class UnknownNode(PlacementError):
    """A node name that is not part of the cluster (the router answers 404)."""


class PlacementAuthority:
    def __init__(self, data_dir: str, shards: int, nodes: list[str], movable: bool = True) -> None:
        self.path = Path(data_dir) / "placement.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.movable = movable  # False in `tellodb serve`: its nodes share one data directory
        if self.path.exists() and movable:
            self._placement = Placement.from_json(json.loads(self.path.read_text()))
            if self._placement.shards != shards:
                raise PlacementError(f"shards: the cluster was created with {self._placement.shards} shards, "
                                     f"cluster.yaml says {shards}; the shard count cannot change")
        else:  # a new cluster; or `tellodb serve`, whose nodes share one data directory: cluster.yaml decides
            self._placement = Placement(shards, tuple(nodes))
            self._save()
        self.joined: dict[str, dict[str, Any]] = {}  # node name -> what its process said at join
        self.moving: dict[int, dict[str, Any]] = {}  # shard -> the move in progress
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.error: str | None = None  # why the last rebalance stopped, until the next one starts
        self.moved_shards = 0
        self.moved_bytes = 0
        self._rebalance: asyncio.Task | None = None
        self._actors: dict[str, Any] = {}

    # ---- the record ---------------------------------------------------------------------------

    def _save(self) -> None:
        """Write the placement atomically (a crash leaves the old file or the new one)."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._placement.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _set(self, placement: Placement) -> None:
        self._placement = placement
        self._save()

    async def placement(self) -> Placement:
        return self._placement

    async def join(self, name: str, info: dict[str, Any]) -> Placement:
        """A `tellodb node` process is up as the home of `name`; it opens the shards the placement gives it."""
        self.joined[name] = {**info, "joined_at": time.time()}
        self._actors.pop(name, None)
        log.info("Node joined name=%s member=%s", name, name in self._placement.nodes)
        if self._placement.moves() and (self._rebalance is None or self._rebalance.done()) and not self.error:
            self._start_rebalance()  # a move interrupted by a restart goes on
        return self._placement

    async def leave(self, name: str) -> None:
        self.joined.pop(name, None)
        self._actors.pop(name, None)

    # ---- changing the members -----------------------------------------------------------------

    async def add_node(self, name: str) -> dict[str, Any]:
        """Make a joined node a member; its share of shards moves to it in the background."""
        self._check_movable()
        if name not in self.joined:
            raise UnknownNode(f"node {name!r} has not joined: start `tellodb node --name {name}` first")
        if name not in self._placement.nodes:
            self._set(self._placement.with_nodes((*self._placement.nodes, name)))
            log.info("Node added name=%s epoch=%d moves=%d", name, self._placement.epoch, len(self._placement.moves()))
        return self._start_rebalance()

    async def remove_node(self, name: str) -> dict[str, Any]:
        """Drain every shard of a member to the others, then forget it."""
        self._check_movable()
        p = self._placement
        if name not in p.nodes and name not in p.owner:
            raise UnknownNode(f"node {name!r} is not a member of the cluster")
        if name in p.nodes:
            if len(p.nodes) == 1:
                raise PlacementError(f"node {name!r} is the last member; it cannot be removed")
            self._set(p.with_nodes(tuple(n for n in p.nodes if n != name)))
            log.info("Node removed name=%s epoch=%d moves=%d", name, self._placement.epoch,
                     len(self._placement.moves()))
        return self._start_rebalance()

    def _check_movable(self) -> None:
        if not self.movable:
            raise PlacementError("`tellodb serve` runs every node in one data directory, so shards cannot move "
                                 "between them; run `tellodb head`, `tellodb node` and `tellodb router` for a "
                                 "cluster that grows (README: Many machines)")

    def _start_rebalance(self) -> dict[str, Any]:
        if self._rebalance is None or self._rebalance.done():
            self.error = None
            self._rebalance = asyncio.get_running_loop().create_task(self._run_rebalance())
        return self._summary()

    async def _run_rebalance(self) -> None:
        """Move shards to their ring node, one at a time, until none is left or one fails."""
        await self._unfence_all()
        while True:
            moves = self._placement.moves()
            if not moves:
                return
            shard, source, target = moves[0]
            missing = [n for n in (source, target) if n not in self.joined]
            if missing:
                self.error = f"waiting for node {missing[0]!r} to join before moving shard {shard}"
                log.warning("Rebalance paused: %s", self.error)
                return
            try:
                await self._move(shard, source, target)
            except Exception as exc:
                self.error = f"moving shard {shard} from {source} to {target} failed: {exc}"
                log.error("Rebalance stopped: %s", self.error)
                return

    async def _unfence_all(self) -> None:
        """Undo fences a stopped authority may have left behind (unfence is idempotent)."""
        for shard, source, _ in self._placement.moves():
            if source in self.joined:
                try:
                    await self._actor(source).unfence.remote(shard)
                except Exception:  # the node may be gone; it has no fence then
                    pass

    # ---- one move -----------------------------------------------------------------------------

    def _actor(self, name: str):
        if name not in self._actors:
            import ray

            from node.actor import NAMESPACE, actor_name

            self._actors[name] = ray.get_actor(actor_name(name), namespace=NAMESPACE)
        return self._actors[name]

    async def _move(self, shard: int, source: str, target: str) -> None:
        src, dst = self._actor(source), self._actor(target)
        move = {"shard": shard, "from": source, "to": target, "state": "copying", "started_at": time.time()}
        self.moving[shard] = move
        started = time.perf_counter()
        flipped = False
        try:
            copied = await dst.receive_shard.remote(shard, source)
            move.update(state="fenced", bytes=copied.get("bytes", 0), memories=copied.get("memories", 0),
                        copy_seconds=round(time.perf_counter() - started, 3),
                        index_seconds=copied.get("index_seconds"))
            fenced = time.perf_counter()
            await src.fence.remote(shard)
            seq = await dst.catch_up.remote(shard, source)
            self._set(self._placement.with_owner(shard, target))
            flipped = True
            await dst.adopt.remote(shard)
            move["fence_ms"] = round((time.perf_counter() - fenced) * 1000, 1)
            move["seq"] = seq
        except BaseException as exc:
            move.update(state="failed", error=str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
            await self._roll_back(shard, source, target, flipped)
            self._finish(move)
            raise
        await self._push()
        try:
            await src.release.remote(shard)
        except Exception as exc:  # the placement is right; a leftover copy on the source is only disk
            log.warning("shard %d: the old copy on %s was not deleted: %s", shard, source, exc)
            move["warning"] = f"old copy on {source} not deleted"
        move.update(state="done", seconds=round(time.perf_counter() - started, 3))
        self.moved_shards += 1
        self.moved_bytes += move.get("bytes", 0)
        log.info("Shard moved shard=%d from=%s to=%s bytes=%s fence_ms=%s seconds=%s epoch=%d", shard, source,
                 target, move.get("bytes"), move.get("fence_ms"), move["seconds"], self._placement.epoch)
        self._finish(move)

    async def _roll_back(self, shard: int, source: str, target: str, flipped: bool) -> None:
        if flipped:  # the target took over on paper but not in fact: the source stays the owner
            self._set(self._placement.with_owner(shard, source))
        for name, method in ((target, "abort_incoming"), (source, "unfence")):
            try:
                await getattr(self._actor(name), method).remote(shard)
            except Exception as exc:
                log.warning("shard %d: %s.%s during roll-back failed: %s", shard, name, method, exc)
        await self._push()

    def _finish(self, move: dict[str, Any]) -> None:
        self.moving.pop(move["shard"], None)
        move["finished_at"] = time.time()
        self.history.append(move)

    async def _push(self) -> None:
        """Give every joined node the new placement (for the free-form ids they look up elsewhere)."""
        placement = self._placement
        calls = [self._actor(n).set_placement.remote(placement) for n in list(self.joined)]
        for name, result in zip(list(self.joined), await asyncio.gather(*calls, return_exceptions=True)):
            if isinstance(result, BaseException):
                log.warning("placement epoch %d not pushed to %s: %s", placement.epoch, name, result)

    # ---- what the operator sees ---------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        p = self._placement
        return {"epoch": p.epoch, "nodes": list(p.nodes), "pending_moves": len(p.moves()),
                "moving": list(self.moving.values()), "error": self.error,
                "rebalancing": self._rebalance is not None and not self._rebalance.done(),
                "moved_shards": self.moved_shards, "moved_bytes": self.moved_bytes}

    async def summary(self) -> dict[str, Any]:
        return self._summary()

    async def status(self) -> dict[str, Any]:
        p = self._placement
        owners = p.by_node()
        nodes = sorted(set(p.nodes) | set(owners) | set(self.joined))
        return {**self._summary(), "shards": p.shards, "owner": list(p.owner),
                "members": {n: {"member": n in p.nodes, "joined": n in self.joined, "shards": owners.get(n, []),
                                **{k: v for k, v in self.joined.get(n, {}).items() if k in ("host", "pid", "data_dir")}}
                            for n in nodes},
                "history": list(self.history)}
