"""The move driver of the placement authority: shards travel to where the placement puts them.

`MoveDriver` is a part of `node.control.authority.PlacementAuthority` (a mixin: it reads and sets
the authority's placement record, `joined`, `down_since`, `moving`, `history`, `handles`). The
rebalance moves one shard at a time (`Placement.moves`); a move (`_move`) copies the shard while
both copies serve nothing new: the target pulls a snapshot and the change log after it
(node.moves), the source fences writes to that shard alone, the target applies the last changes,
the owner flips at a new epoch and is saved before anyone is told, and only then does the source
delete its copy. A failure before the flip rolls back (the target's copy dropped, the source
unfenced) and is reported; the flip is the one point of no return, so a shard always has exactly
one owner. When every copy is in place, primaries are handed to other copies where the balance
wants them (`_hand_over`: a fence, equal copies checked, a flip; no data moves). Every new placement
is pushed to the joined nodes (`_push`). After a move that copied data the rebalance waits to keep
under `rebalance.max_bytes_per_s` (`_pace`, node.control.autobalance).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger("tellodb")
HANDOVER_ROUNDS = 3  # handover plans carried out before a rebalance that does not settle stops and says so


def failure(exc: BaseException) -> str:
    """What a failed move (or handover, or split) says in the status: the error's first line."""
    return str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__


class MoveDriver:
    def _start_rebalance(self) -> dict[str, Any]:
        if self._rebalance is None or self._rebalance.done():
            self.error = None
            self._want_rebalance(True)  # a restarted head goes on with it (node.control.autobalance)
            self._rebalance = asyncio.get_running_loop().create_task(self._run_rebalance())
            self._rebalance.add_done_callback(self._rebalance_ended)
        return self._summary()

    async def _run_rebalance(self) -> None:
        """Move copies to where the placement puts them, one at a time (asking again after each:
        each move lowers the excess over the quotas by one), then hand primaries over: the whole
        handover plan as it was asked for, since asked again after each handover it can go round
        (a chain of handovers only helps once all of it is done), until none is left or one fails."""
        self.paused = False
        await self._unfence_all()
        plan: list[tuple[int, str, str]] = []
        rounds = 0
        while True:
            moves = self._placement.moves()
            if moves:
                plan, rounds = [], 0
            elif not plan:
                plan, rounds = self._placement.handovers(), rounds + 1
                if plan and rounds > HANDOVER_ROUNDS:
                    self.error = f"{len(plan)} primary handovers still planned after {HANDOVER_ROUNDS} rounds"
                    log.error("Rebalance stopped: %s", self.error)
                    return
            steps = moves or plan
            if not steps:
                return
            if not moves:
                shard, source, target = plan[0]
                if self._placement.owner[shard] != source or target not in self._placement.replicas[shard]:
                    plan.pop(0)  # the copies changed since the plan (a failover): the next round sees to it
                    continue
            if self.recovering:
                self.error, self.paused = "waiting for the nodes to rebuild the placement", True
                return
            shard, source, target = steps[0]
            primary = self._placement.owner[shard]
            missing = [n for n in (primary, target) if n is not None and (n not in self.joined or n in self.down_since)]
            if missing:
                self.error = f"waiting for node {missing[0]!r} to join (or answer) before moving shard {shard}"
                self.paused = True
                log.warning("Rebalance paused: %s", self.error)
                return
            try:
                if moves:
                    await self._move(shard, source, target)
                else:
                    await self._hand_over(shard, source, target)
                    plan.pop(0)
            except Exception as exc:
                what = "moving shard" if moves else "handing the primary of shard"
                self.error = f"{what} {shard} from {source} to {target} failed: {exc}"
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
            move.update(state="failed", error=failure(exc))
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
        await self._pace(move)  # rebalance.max_bytes_per_s (node.control.autobalance)

    async def _hand_over(self, shard: int, source: str, target: str) -> None:
        """Make `target`, a follower copy of `shard`, its primary in place of `source` (no data
        copied): the primary is fenced (new writes refused, those in flight finish; routers retry),
        the follower must hold exactly the same last change (seq and digest: writes are acknowledged
        by every live copy, so it does unless it was marked down), the placement flips at a new
        epoch and is pushed, and the old primary, unfenced, serves on as a follower."""
        move = {"shard": shard, "from": source, "to": target, "state": "handing over", "handover": True,
                "started_at": time.time()}
        self.moving[shard] = move
        started = time.perf_counter()
        old = self.handles.get(source)
        try:
            await old.fence.remote(shard)
            have, want = await asyncio.gather(self.handles.get(target).copy_state.remote(shard),
                                              old.copy_state.remote(shard))
            if tuple(have) != tuple(want):
                raise RuntimeError(f"the copy on {target} is at seq {have[0]}, the primary at {want[0]}: "
                                   "not handed over (it is caught up in the background; try again)")
            self._set(self._placement.with_primary(shard, target))
            await self._push()
        except BaseException as exc:
            move.update(state="failed", error=failure(exc))
            raise
        finally:
            try:
                await old.unfence.remote(shard)
            except Exception as exc:  # it is gone: no fence is left behind with it
                log.warning("shard %d: unfencing %s after the handover failed: %s", shard, source, exc)
            move["fence_ms"] = round((time.perf_counter() - started) * 1000, 1)
            if move["state"] != "failed":
                move["state"] = "done"
                move["seconds"] = round(time.perf_counter() - started, 3)
                log.info("Primary handed over shard=%d from=%s to=%s fence_ms=%s epoch=%d", shard, source, target,
                         move["fence_ms"], self._placement.epoch)
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
