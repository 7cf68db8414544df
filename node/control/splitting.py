"""Shards that split while they serve: the placement authority's side (node.splits is the node's).

`SplitDriver` is a part of `node.control.authority.PlacementAuthority` (a mixin: it reads and sets
the authority's placement record, `joined`, `moving`, `history`, `handles`, and runs in the move
driver's task slot, node.control.rebalance, so a split and moves never overlap).

A split of shard s (`split`, `tellodb cluster split`, or the size policy) is made on the node P of
s's primary: P copies s into two halves by one more bit of the entity hash while s serves
(`prepare_split`), s is fenced for the last changes (`catch_up_split`; writes to s wait, routers
retry), the placement with the split (`Placement.with_split`: a new shard numbered next) is saved
at a new epoch, P serves the halves (`adopt_split`) and s is unfenced. The follower copies of s
held the whole shard, so they are dropped (and deleted), and the rebalance then adds the copies
both halves are short of and places the new shard where the balance wants it (in a movable
cluster; `tellodb serve` keeps it on P). A failure before the save rolls back: P drops the halves,
s is unfenced; s is as before.

Size policy (`max_shard_bytes`, 0: off): a task of its own (the nodes' stats must not delay the
failover watcher's pings) asks the nodes for their shards' sizes every `SPLIT_CHECK_S` and splits
the largest primary over the limit, one at a time, when nothing else moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from node.control.errors import PlacementError
from node.control.rebalance import failure

log = logging.getLogger("tellodb")
SPLIT_CHECK_S = 30.0  # how often the size policy asks the nodes for their shards' sizes


class SplitDriver:
    max_shard_bytes = 0
    SPLIT_CHECK_S = SPLIT_CHECK_S
    _size_policy: asyncio.Task | None = None

    def _busy(self) -> bool:
        return self._rebalance is not None and not self._rebalance.done()

    async def split(self, shard: int | None = None) -> dict[str, Any]:
        """Split `shard` (None: the largest primary) in the background; the summary at once. It
        refuses (PlacementError) while shards move or before the placement is known."""
        self._check_ready()
        p = self._placement
        if shard is None:
            sizes = await self._shard_sizes()
            if not sizes:
                raise PlacementError("no node reported its shards' sizes; name the shard to split")
            shard = max(sizes, key=sizes.get)
        if not 0 <= shard < p.shards:
            raise PlacementError(f"no shard {shard}: shards are 0 to {p.shards - 1}")
        if self._busy():
            raise PlacementError("shards are moving or splitting now; split when that has finished "
                                 "(`tellodb cluster status`)")
        if p.owner[shard] not in self.joined or p.owner[shard] in self.down_since:
            raise PlacementError(f"shard {shard}'s primary {p.owner[shard]!r} does not answer; split it once it does")
        self.error = None
        self._rebalance = asyncio.get_running_loop().create_task(self._split_then_rebalance(shard))
        self._rebalance.add_done_callback(self._rebalance_ended)
        return {**self._summary(), "splitting": shard}

    async def _split_then_rebalance(self, shard: int) -> None:
        try:
            await self._split(shard)
        except Exception as exc:
            self.error = f"splitting shard {shard} failed: {exc}"
            log.error("Split stopped: %s", self.error)
            return
        if self.movable and (self._placement.moves() or self._placement.handovers()):
            self._want_rebalance(True)
            await self._run_rebalance()

    async def _split(self, shard: int) -> None:
        before = self._placement
        after = before.with_split(shard)
        child = after.shards - 1
        primary_name = before.owner[shard]
        primary = self.handles.get(primary_name)
        move = {"shard": shard, "from": primary_name, "to": primary_name, "split": True, "child": child,
                "state": "splitting", "started_at": time.time()}
        self.moving[shard] = move
        started = time.perf_counter()
        saved = False
        try:
            prepared = await primary.prepare_split.remote(shard, after)
            move.update(state="fenced", bytes=prepared["bytes"], memories=prepared["memories"],
                        copy_seconds=prepared["copy_seconds"])
            fenced = time.perf_counter()
            await primary.fence.remote(shard)
            move["seq"] = await primary.catch_up_split.remote(shard)
            now = self._placement  # other changes meanwhile (a follower marked behind) are kept
            if now.shards != before.shards or now.owner[shard] != primary_name:
                raise RuntimeError("the placement changed during the split (a failover?): not split")
            after = now.with_split(shard)
            self._set(after)
            saved = True
            await primary.adopt_split.remote(shard, after)
            move["fence_ms"] = round((time.perf_counter() - fenced) * 1000, 1)
        except BaseException as exc:
            move.update(state="failed", error=failure(exc))
            if not saved:
                for method in ("abort_split", "unfence"):
                    try:
                        await getattr(primary, method).remote(shard)
                    except Exception as undo:
                        log.warning("shard %d: %s during the split's roll-back failed: %s", shard, method, undo)
            self._finish(move)
            raise
        finally:
            if saved:  # the halves serve (or will, when the node next starts): writes go on
                try:
                    await primary.unfence.remote(shard)
                except Exception as exc:
                    log.warning("shard %d: unfencing %s after the split failed: %s", shard, primary_name, exc)
        await self._push()
        for follower in before.followers(shard):  # their copies held the whole shard: copied again by the rebalance
            await self._release(shard, follower, move)
        move.update(state="done", seconds=round(time.perf_counter() - started, 3))
        log.info("Shard split shard=%d child=%d node=%s memories=%s fence_ms=%s seconds=%s epoch=%d", shard, child,
                 primary_name, move.get("memories"), move.get("fence_ms"), move["seconds"], self._placement.epoch)
        self._finish(move)

    async def _shard_sizes(self) -> dict[int, int]:
        """Each primary's size in bytes, from its node's stats."""
        p = self._placement
        names = [n for n in set(p.owner) if n in self.joined and n not in self.down_since]

        async def stats(name: str) -> dict:
            return await asyncio.wait_for(self.handles.get(name).stats.remote(), 30)

        sizes: dict[int, int] = {}
        for name, found in zip(names, await asyncio.gather(*(stats(n) for n in names), return_exceptions=True)):
            if isinstance(found, BaseException):
                continue
            for s, info in found.get("per_shard", {}).items():
                if int(s) < p.shards and p.owner[int(s)] == name:
                    sizes[int(s)] = int(info.get("bytes", 0))
        return sizes

    def _ensure_size_policy(self) -> None:
        if self.max_shard_bytes and (self._size_policy is None or self._size_policy.done()):
            self._size_policy = asyncio.get_running_loop().create_task(self._watch_sizes())

    async def _watch_sizes(self) -> None:
        while True:
            await asyncio.sleep(self.SPLIT_CHECK_S)
            if self.recovering or self._busy():
                continue
            try:
                await self._split_largest()
            except Exception as exc:  # a node that does not answer: the next look
                log.warning("the size policy's look at the shards failed: %s", exc)

    async def _split_largest(self) -> None:
        """Split the largest primary over `max_shard_bytes`, if nothing moves meanwhile."""
        sizes = await self._shard_sizes()
        over = {s: n for s, n in sizes.items() if n > self.max_shard_bytes}
        if over:
            shard = max(over, key=over.get)
            log.info("Shard over max_shard_bytes shard=%d bytes=%d max_shard_bytes=%d", shard, over[shard],
                     self.max_shard_bytes)
            try:
                if not self._busy():
                    await self.split(shard)
            except Exception as exc:
                log.warning("shard %d not split: %s", shard, exc)
