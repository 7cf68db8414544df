"""Health and failover in the placement authority: who answers, and who takes over a primary.

`Failover` is a part of `node.control.authority.PlacementAuthority` (a mixin: it reads and sets the
authority's placement record, `joined`, `down_since`, `failovers`, `handles`). The watcher pings
every joined node; one silent for `failover_after_s` loses its primaries to its live follower with
the highest sequence number, one silent for `rebuild_after_s` stops being a member (its copies are
rebuilt elsewhere by the move driver).
"""

from __future__ import annotations

import asyncio
import logging
import time
from node.tuning import STATUS_HISTORY

log = logging.getLogger("tellodb")



class Failover:
    PING_EVERY_S = 0.5
    LOOK_EVERY_S = 2.0

    async def _watch(self) -> None:
        """Ping every joined node; one silent for `failover_after_s` loses its primaries to followers,
        one silent for `rebuild_after_s` stops being a member (its copies are rebuilt elsewhere)."""
        while True:
            await asyncio.sleep(self.PING_EVERY_S)
            if time.monotonic() - self._looked_for > self.LOOK_EVERY_S and self._expected() - set(self.joined):
                self._looked_for = time.monotonic()
                await self._look_for_running_nodes()
            names = list(self.joined)
            results = await asyncio.gather(*(self._ping(n) for n in names))
            now = time.monotonic()
            for name, ok in zip(names, results):
                if ok:
                    if self.down_since.pop(name, None) is not None:
                        log.info("Node answers again name=%s", name)
                        self._auto_add()  # taken out for its silence: a member again with auto_rebalance
                    continue
                since = self.down_since.setdefault(name, now)
                if since == now:
                    log.warning("Node not answering name=%s", name)
                if self.recovering:
                    continue  # no failover before every shard has a known copy
                if now - since >= self.failover_after_s and name in self._placement.owner:
                    try:
                        await self._fail_over(name, lost=now - since >= self.rebuild_after_s)
                    except Exception as exc:
                        log.error("failover from %s failed: %s", name, exc)
                if (now - since >= self.rebuild_after_s and name in self._placement.nodes
                        and len(self._placement.nodes) > 1):
                    log.warning("Node away for %.0f s, its copies are rebuilt elsewhere name=%s", now - since, name)
                    self._set(self._placement.with_nodes(tuple(n for n in self._placement.nodes if n != name)))
                    self.error = None
                    self._start_rebalance()

    async def _ping(self, name: str) -> bool:
        """Whether `name` answers; one that answers with an older placement (it was silent when a
        newer one was pushed: paused, partitioned) is given the current one."""
        try:
            answer = await asyncio.wait_for(self.handles.get(name).ping.remote(watch=True), 1.0)
        except Exception:
            self.handles.forget(name)  # a restarted node is a new actor
            return False
        if answer.get("epoch", self._placement.epoch) < self._placement.epoch:
            await self._push_to(name)
        await self._record_behind(name, answer.get("followers") or {})
        return True

    async def _record_behind(self, name: str, followers: dict) -> None:
        """Record the followers `name` reports down for the shards it is primary of as behind (its
        writes wait for that before they are acknowledged without them), and forget the ones live again."""
        p = self._placement
        down, live = set(), set()
        for shard, links in followers.items():
            shard = int(shard)
            if shard < p.shards and p.owner[shard] == name:
                for follower, up in links.items():
                    (live if up else down).add((shard, follower))
        add, drop = down - set(p.behind), live & set(p.behind)
        if add or drop:
            changed = p.with_behind(add, drop)
            if changed is p:  # copies the placement no longer lists as followers
                return
            self._set(changed)
            log.warning("Copies behind their primary: %s", " ".join(f"{s}@{n}" for s, n in changed.behind) or "none")
            await self._push()

    async def _fail_over(self, name: str, lost: bool = False) -> None:
        """Give each shard whose primary is `name` to its live follower with the highest sequence
        number that is not behind (with synchronous replication it holds every acknowledged write).
        A shard whose live followers are all behind waits for its primary, unless the primary is
        `lost` (silent past `rebuild_after_s`): then the best of them takes over, and the writes it
        missed are gone (an unclean failover, logged as an error)."""
        p = self._placement
        changed = []
        for shard in p.primaries_of(name):
            candidates = [n for n in p.followers(shard) if n in self.joined and n not in self.down_since
                          and (lost or not p.is_behind(shard, n))]
            states = await asyncio.gather(*(self._copy_seq(n, shard) for n in candidates))
            live = [(seq, n) for n, seq in zip(candidates, states) if seq is not None]
            if not live:
                continue  # no copy answers: the shard waits for its primary
            seq, best = max(live, key=lambda found: (not p.is_behind(shard, found[1]), found[0]))
            if p.is_behind(shard, best):
                log.error("Unclean failover: shard %d goes to %s, which misses writes %s acknowledged", shard, best,
                          name)
            p = p.with_primary(shard, best).with_behind({(shard, name)})  # the old primary: down, so behind
            changed.append({"shard": shard, "from": name, "to": best, "seq": seq, "at": time.time(),
                            "epoch": p.epoch})
        if not changed:
            return
        self._set(p)
        self.failover_count += len(changed)
        self.failovers = (self.failovers + changed)[-STATUS_HISTORY:]
        log.warning("Failover from=%s shards=%s epoch=%d", name, [c["shard"] for c in changed], p.epoch)
        await self._push()

    async def _copy_seq(self, name: str, shard: int) -> int | None:
        try:
            state = await asyncio.wait_for(self.handles.get(name).copy_state.remote(shard), 2.0)
            return int(state[0])
        except Exception:
            return None
