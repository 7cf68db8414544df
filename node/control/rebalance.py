"""The move driver of the placement authority: shards travel to where the placement puts them.

`MoveDriver` is a part of `node.control.authority.PlacementAuthority` (a mixin: it reads and sets
the authority's placement record, `joined`, `down_since`, `moving`, `history`, `handles`). The
rebalance moves one shard at a time (`Placement.moves`); a move (`_move`) copies the shard while
both copies serve nothing new: the target pulls a snapshot and the change log after it
(node.moves), the source fences writes to that shard alone, the target applies the last changes,
the owner flips at a new epoch and is saved before anyone is told, and only then does the source
delete its copy. A failure before the flip rolls back (the target's copy dropped, the source
unfenced) and is reported; the flip is the one point of no return, so a shard always has exactly
one owner. Every new placement is pushed to the joined nodes (`_push`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("tellodb")


class MoveDriver:
    def _start_rebalance(self) -> dict[str, Any]:
        if self._rebalance is None or self._rebalance.done():
            self.error = None
            self._rebalance = asyncio.get_running_loop().create_task(self._run_rebalance())
        return self._summary()

    async def _run_rebalance(self) -> None:
        """Move shards to their ring node, one at a time, until none is left or one fails."""
        self.paused = False
        await self._unfence_all()
        while True:
            moves = self._placement.moves()
            if not moves:
                return
            if self.recovering:
                self.error, self.paused = "waiting for the nodes to rebuild the placement", True
                return
            shard, source, target = moves[0]
            primary = self._placement.owner[shard]
            missing = [n for n in (primary, target) if n is not None and (n not in self.joined or n in self.down_since)]
            if missing:
                self.error = f"waiting for node {missing[0]!r} to join (or answer) before moving shard {shard}"
                self.paused = True
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
        for shard, _, _ in self._placement.moves():
            primary = self._placement.owner[shard]
            if primary in self.joined:
                try:
                    await self.handles.get(primary).unfence.remote(shard)
                except Exception:  # the node may be gone; it has no fence then
                    pass

    async def _move(self, shard: int, source: str | None, target: str | None) -> None:
        """Move the copy of `shard` on `source` to `target` (None: add a copy on `target`, or drop the
        one on `source`). The data always comes from the primary, the one copy that is surely current.
        Writes pause (a fence on the primary) only when the primary itself leaves; a new follower
        needs none, since the primary pushes it every change after its own sequence number."""
        primary_name = self._placement.owner[shard]
        primary = self.handles.get(primary_name)
        move = {"shard": shard, "from": source, "to": target, "state": "copying", "started_at": time.time()}
        self.moving[shard] = move
        started = time.perf_counter()
        flipped = fenced_primary = False
        if target is None:  # a copy to drop: the placement first, then the files
            self._set(self._placement.with_copy_dropped(shard, source))
            await self._push()
            await self._release(shard, source, move)
            move.update(state="done", seconds=round(time.perf_counter() - started, 3), bytes=0, memories=0,
                        fence_ms=0.0)
            self._finish(move)
            return
        dst = self.handles.get(target)
        try:
            copied = await dst.receive_shard.remote(shard, primary_name)
            move.update(state="catching up", bytes=copied.get("bytes", 0), memories=copied.get("memories", 0),
                        copy_seconds=round(time.perf_counter() - started, 3),
                        index_seconds=copied.get("index_seconds"))
            fenced = time.perf_counter()
            if source == primary_name:
                move["state"] = "fenced"
                await primary.fence.remote(shard)
                fenced_primary = True
            seq = await dst.catch_up.remote(shard, primary_name)
            placement = (self._placement.with_copy_added(shard, target) if source is None
                         else self._placement.with_copy_moved(shard, source, target))
            self._set(placement)
            flipped = True
            await dst.adopt.remote(shard)
            move["fence_ms"] = round((time.perf_counter() - fenced) * 1000, 1) if fenced_primary else 0.0
            move["seq"] = seq
        except BaseException as exc:
            move.update(state="failed", error=str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
            await self._roll_back(shard, primary_name, source, target, flipped)
            self._finish(move)
            raise
        await self._push()
        if source is not None:
            await self._release(shard, source, move)
        move.update(state="done", seconds=round(time.perf_counter() - started, 3))
        self.moved_shards += 1
        self.moved_bytes += move.get("bytes", 0)
        log.info("Shard moved shard=%d from=%s to=%s bytes=%s fence_ms=%s seconds=%s epoch=%d", shard, source,
                 target, move.get("bytes"), move.get("fence_ms"), move["seconds"], self._placement.epoch)
        self._finish(move)

    async def _release(self, shard: int, source: str, move: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(self.handles.get(source).release.remote(shard), 60)
        except Exception as exc:  # the placement is right; a leftover copy on the source is only disk
            log.warning("shard %d: the old copy on %s was not deleted: %s", shard, source, exc)
            move["warning"] = f"old copy on {source} not deleted"

    async def _roll_back(self, shard: int, primary: str, source: str | None, target: str, flipped: bool) -> None:
        if flipped:  # the target took over on paper but not in fact: the copies stay where they were
            p = self._placement
            copies = tuple(n for n in p.replicas[shard] if n != target)
            if source is not None and source not in copies:
                copies = (source, *copies) if source == primary else (*copies, source)
            self._set(p._with_replicas(shard, copies))
        for name, method in ((target, "abort_incoming"), (primary, "unfence")):
            try:
                await getattr(self.handles.get(name), method).remote(shard)
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
        names = [n for n in self.joined if n not in self.down_since]

        down = tuple(sorted(self.down_since))

        async def push(name: str) -> Any:
            return await asyncio.wait_for(self.handles.get(name).set_placement.remote(placement, down), 10)

        for name, result in zip(names, await asyncio.gather(*(push(n) for n in names), return_exceptions=True)):
            if isinstance(result, BaseException):
                log.warning("placement epoch %d not pushed to %s: %s", placement.epoch, name, result)
