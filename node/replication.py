"""A primary's side of shard replicas: synchronous, on the change log (node/store/changelog.py).

Per shard this node is the primary of (by its placement view), one `Link` per follower. A write
that committed here waits, before it is answered, until every live follower of each shard it
touched has applied the shard's log as far as it reached after that commit (`Replication.wait`).
Each link has one pusher at a time: it reads `changes_since(acked)` on the store thread and calls
the follower's `apply_changes`; writers that arrive meanwhile wait for its next read, so one push
carries every write queued behind it. Rounds, not seq numbers, say when a writer is served: a
read that started after the writer's commit and reached the end of the log, applied by the
follower, holds its changes (erases leave gaps in the log, so a seq target could be unreachable).

A follower that fails or does not answer within `replica_timeout_s` is marked down: writes stop
waiting for it, and fail with TooFewReplicas (after their local commit) when fewer than
`min_live_replicas` copies stay live. Before a write is acknowledged without a down follower, the
placement authority records that copy as behind (it learns of it from this node's answer to its
ping and pushes the placement back): a failover never promotes a copy that misses acknowledged
writes (Kafka's in-sync replicas). A catch-up task then retries about every second with a fresh
actor handle (a restarted node is a new actor): it compares the follower's `copy_state` with this
log; a copy ahead of it, diverged (an ex-primary's writes never replicated) or older than the log
reaches is re-seeded (`Node.reseed`: a snapshot of this copy and the log after it), any other is
sent the changes it misses. Caught up, it is live again.

With one copy per shard there are no links and a write does not wait at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from node.config import ClusterConfig
from node.errors import NodeError, NotOwnedError, TooFewReplicas
from node.moves import reseed_pin
from node.names import Handles
from node.shard_set import ShardSet
from node.tuning import PUSH_PAGE, CATCH_UP_RETRY_S

log = logging.getLogger("tellodb.node")



def _actor_gone(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


class Diverged(NodeError):
    """The follower's copy cannot be brought up to date from this log: it must be re-seeded."""


class Link:
    """One follower of one shard, seen from its primary."""

    def __init__(self, repl: Replication, shard: int, follower: str) -> None:
        self.repl = repl
        self.shard = shard
        self.follower = follower
        self.live = True  # writes wait for it (a new link is live until it fails to answer)
        self.acked: int | None = None  # the follower's seq as it last answered; None: ask it
        self.started = 0  # reads of the log begun by pushes
        self.synced = 0  # the newest such read, up to the log's end, the follower has applied
        self.wanted = 0  # the newest read some writer waits for
        self.error: str | None = None  # why it is down
        self.down_since: float | None = None
        self.handle: Any = None
        self.closed = False
        self._moved = asyncio.Event()
        self._pusher: asyncio.Task | None = None
        self._catcher: asyncio.Task | None = None

    # ---- writers --------------------------------------------------------------------------

    def want(self) -> int:
        """Ask for a push that reads the log after now; the round to wait for."""
        need = self.started + 1
        self.wanted = max(self.wanted, need)
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push())
        return need

    async def reached(self, need: int) -> None:
        """Wait until round `need` is applied on the follower, or the follower is down."""
        while self.live and not self.closed and self.synced < need:
            await self._moved.wait()

    def _changed(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    # ---- pushing --------------------------------------------------------------------------

    async def _push(self) -> None:
        retried = False
        while self.live and not self.closed and self.synced < self.wanted:
            try:
                if self.acked is None:
                    await self._handshake()
                self.started += 1
                round_ = self.started
                changes = await self._send_after(self.acked)
                if changes is not None and len(changes) < PUSH_PAGE:
                    self.synced = max(self.synced, round_)
                self._changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not retried and _actor_gone(exc):
                    # A restarted node is a new actor: look it up again (and ask its seq) once.
                    retried, self.handle, self.acked = True, None, None
                    self.repl.handles.forget(self.follower)
                    continue
                self.down(exc)
                return

    async def _send_after(self, after: int) -> list | None:
        """Send the follower the changes after `after` (one page); the page, or None when the
        follower answered with a gap (it is behind `after`: `acked` is its seq now)."""
        changes = await self.repl.read(self.shard, after)
        if not changes:
            return changes
        seq = await self._call("apply_changes", self.shard, changes, self.repl.shards.name, after)
        if seq > changes[-1].seq:
            raise Diverged(f"shard {self.shard}: {self.follower} answered seq {seq}, past {changes[-1].seq}")
        self.acked = seq
        return changes if seq == changes[-1].seq else None

    async def _handshake(self) -> None:
        """Learn the follower's seq; Diverged if its copy cannot be brought up to date from here."""
        try:
            state = await self._call("copy_state", self.shard)
        except NotOwnedError:
            state = None
        if await self.repl.needs_reseed(self.shard, state):
            raise Diverged(f"shard {self.shard}: the copy on {self.follower} ({state}) is not a prefix of this log")
        self.acked = state[0]

    async def _call(self, method: str, *args: Any, timeout: float | None = -1) -> Any:
        if self.handle is None:
            self.handle = self.repl.handles.get(self.follower)
        ref = getattr(self.handle, method).remote(*args)
        if timeout == -1:
            timeout = self.repl.config.replica_timeout_s

        async def answer():
            return await ref

        return await asyncio.wait_for(answer(), timeout)

    # ---- down and back ----------------------------------------------------------------------

    def down(self, why: BaseException) -> None:
        """Stop waiting for the follower; catch it up in the background."""
        if self.closed:
            return
        if self.live:
            self.repl.marked_down += 1
            self.down_since = time.time()
            log.warning("%s: follower %s of shard %d is down: %r", self.repl.shards.name, self.follower,
                        self.shard, why)
        self.live = False
        self.error = repr(why)
        self.acked = None
        self.handle = None
        self.repl.handles.forget(self.follower)
        self._changed()
        if self._catcher is None or self._catcher.done():
            self._catcher = asyncio.get_running_loop().create_task(self._catch_up())

    async def _catch_up(self) -> None:
        while not self.closed:
            await asyncio.sleep(CATCH_UP_RETRY_S)
            reseeded = False
            try:
                self.handle = self.repl.handles.get(self.follower, fresh=True)
                try:
                    state = await self._call("copy_state", self.shard)
                except NotOwnedError:  # no copy there (a re-seed that failed half-way)
                    state = None
                if await self.repl.needs_reseed(self.shard, state):
                    reseeded = True
                    self.acked = await self._call("reseed", self.shard, self.repl.shards.name, timeout=None)
                    self.repl.reseeds += 1
                else:
                    self.acked = state[0]
                while True:
                    changes = await self._send_after(self.acked)
                    if changes is not None and len(changes) < PUSH_PAGE:
                        break
                self.live, self.error, self.down_since = True, None, None
                log.info("%s: follower %s of shard %d is live again at seq %d", self.repl.shards.name,
                         self.follower, self.shard, self.acked)
                self.want()  # what was written since the last read
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not there yet, not answering, refusing: try again
                self.error = repr(exc)
                self.acked = None
                self.handle = None
            finally:
                if reseeded:
                    await self.repl.unpin(self.shard, reseed_pin(self.follower))

    def close(self) -> None:
        self.closed = True
        self.live = False
        for task in (self._pusher, self._catcher):
            if task is not None:
                task.cancel()
        self._changed()

    def status(self, seq: int | None) -> dict[str, Any]:
        return {"acked": self.acked, "live": self.live, "lag": None if seq is None or self.acked is None
                else seq - self.acked, "error": self.error, "down_since": self.down_since}


class Replication:
    """The node's links to the followers of the shards it is primary of (each held in its
    primary copy's `Replica.links`, node.replica)."""

    def __init__(self, shards: ShardSet, handles: Handles, config: ClusterConfig) -> None:
        self.shards = shards
        self.handles = handles
        self.config = config
        self.synced_epoch: int | None = None  # the placement epoch the links follow
        self.waited = 0  # writes that waited for followers
        self.marked_down = 0  # followers marked down
        self.reseeds = 0  # followers re-seeded from here
        # Pinged by a placement authority: a down follower must be recorded behind before a write is
        # acknowledged without it (a node no authority watches has no failover that could promote it).
        self.watched = False

    def sync(self, force: bool = False) -> None:
        """Make the links follow the node's placement view (needs the running loop): a link for
        each follower of each shard owned here and primary here, none for any other."""
        placement = self.shards.placement
        if placement.epoch == self.synced_epoch and not force:
            return
        self.synced_epoch = placement.epoch
        for s, replica in list(self.shards.replicas.items()):
            want = set(placement.followers(s)) if placement.owner[s] == self.shards.name else set()
            for f in [f for f in replica.links if f not in want]:
                replica.links.pop(f).close()
            for f in want - set(replica.links):
                link = replica.links[f] = Link(self, s, f)
                link.want()  # a new follower (or this node is new as its primary): bring it up to date now

    @property
    def links(self) -> dict[int, dict[str, Link]]:
        """shard -> follower -> link, for the copies here that have followers."""
        return {s: r.links for s, r in list(self.shards.replicas.items()) if r.links}

    def mark_down(self, nodes: tuple[str, ...]) -> None:
        """Followers on `nodes` (silent, says the placement authority) are down now."""
        for links in self.links.values():
            for follower, link in links.items():
                if follower in nodes and link.live:
                    link.down(NodeError(f"the placement authority finds {follower} silent"))

    async def wait(self, shards: set[int]) -> None:
        """After a write to `shards` committed here: wait until their live followers hold it;
        TooFewReplicas if fewer than `min_live_replicas` copies of one of them are live."""
        minimum = self.config.min_live_replicas
        followers = {s: self._links_of(s) for s in shards}
        links = [link for found in followers.values() for link in found if link.live]
        if links:
            self.waited += 1
            await asyncio.gather(*(link.reached(link.want()) for link in links))
        if minimum > 1:
            for s in shards:
                live = 1 + sum(link.live for link in followers[s])
                if live < minimum:
                    raise TooFewReplicas(
                        f"shard {s}: {live} live cop{'y' if live == 1 else 'ies'}, fewer than min_live_replicas "
                        f"({minimum}); the write is stored on {self.shards.name} but not acknowledged")
        if self.watched:
            await self._recorded_behind(followers)

    async def _recorded_behind(self, followers: dict[int, list[Link]]) -> None:
        """Wait (up to `replica_timeout_s`) until the authority's placement, pushed here, records each
        down follower of these shards as behind: until then a failover could make it the primary and
        the writes it missed would be lost. TooFewReplicas if it does not come (the head is away)."""
        deadline = time.monotonic() + self.config.replica_timeout_s
        while True:
            view = self.shards.placement
            missing = [(s, link.follower) for s, found in followers.items() for link in found
                       if not link.live and not view.is_behind(s, link.follower)]
            if not missing:
                return
            if time.monotonic() > deadline:
                s, follower = missing[0]
                raise TooFewReplicas(
                    f"shard {s}: follower {follower} is down and the placement authority has not recorded that "
                    f"it misses writes; the write is stored on {self.shards.name} but not acknowledged")
            await asyncio.sleep(0.02)

    def _links_of(self, shard: int) -> list[Link]:
        replica = self.shards.replicas.get(shard)
        return list(replica.links.values()) if replica is not None else []

    # ---- the store thread and other nodes ---------------------------------------------------------

    async def read(self, shard: int, after: int) -> list:
        """This copy's changes after `after` (one page); Diverged if the log was trimmed past it."""

        def read() -> list:
            store = self.shards.store(shard)
            if store.trimmed_to() > after:
                raise Diverged(f"shard {shard}: the log of {self.shards.name} was trimmed past seq {after}")
            return store.changes_since(after, PUSH_PAGE)

        return await self.shards.run(read)

    async def needs_reseed(self, shard: int, state: tuple[int, str | None] | None) -> bool:
        """Whether a copy at `state` (its `copy_state`, None: no copy) cannot be brought up to date
        from this log: it is ahead of it, its change at its seq differs from ours (it diverged), or
        this log no longer has that change (trimmed, erased)."""
        if state is None:
            return True
        seq, digest = state

        def compare() -> bool:
            store = self.shards.store(shard)
            if seq > store.last_seq():
                return True
            if seq == 0:
                return store.trimmed_to() > 0
            mine = store.digest_at(seq)
            return mine is None or digest != mine

        return await self.shards.run(compare)

    async def unpin(self, shard: int, pin: str) -> None:
        def release() -> None:
            if shard in self.shards.held:
                self.shards.store(shard).pin_log(pin, None)

        try:
            await self.shards.run(release)
        except Exception:
            log.exception("%s: releasing log pin %s of shard %d failed", self.shards.name, pin, shard)

    # ---- status -----------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {"writes_waited": self.waited, "followers_marked_down": self.marked_down, "reseeds": self.reseeds}

    def summary(self) -> dict[str, Any]:
        links = [link for links in self.links.values() for link in links.values()]
        return {**self.counters(), "followers": len(links), "followers_down": sum(not link.live for link in links)}

    def close(self) -> None:
        for replica in list(self.shards.replicas.values()):
            replica.close_links()
