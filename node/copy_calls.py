"""The node's methods that other nodes and the placement authority call: snapshots, the change log,
a shard copy's move (node.moves), the placement view, and the follower's side of replication.

`CopyCalls` is a part of `node.service.Node` (a mixin over its shard set `copies`, `moves`,
`replication`, `snapshots` and `indexer`), kept apart so the node's client API reads on its own.
"""

from __future__ import annotations

import logging
from typing import Any

from node.control import placement_file
from node.control.placement import Placement
from node.moves import MOVE_PIN
from node.store import ShardStore

log = logging.getLogger("tellodb")


class CopyCalls:
    # ---- snapshots (node.snapshots) ----------------------------------------------------------------

    async def snapshot(self, shard: int, pin: str | None = None) -> dict[str, Any]:
        """Take a consistent copy of `shard` into this node's snapshot folder; its id, sequence
        number, size and sha256. Read it with `read_snapshot`, then `drop_snapshot`. With `pin`,
        the changes after the copy stay in the log (beyond `changelog_keep`) until that pin is
        released: it is set before the copy is taken, so at or below the copy's sequence number."""

        def open_and_pin() -> ShardStore:
            store = self.copies.store(shard)  # an empty shard is created: every shard has a copy
            if pin is not None:
                store.pin_log(pin, store.last_seq())
            return store

        store = await self.copies.run(open_and_pin)
        return await self.snapshots.take(store, shard)

    async def read_snapshot(self, snapshot_id: str, offset: int, size: int) -> bytes:
        return await self.snapshots.read(snapshot_id, offset, size)

    async def drop_snapshot(self, snapshot_id: str) -> None:
        self.snapshots.drop(snapshot_id)

    # ---- the change log and shard moves (node.moves) -------------------------------------------

    async def changes_since(self, shard: int, after: int, limit: int = 1000) -> list:
        """`shard`'s changes after sequence number `after`, oldest first (changelog.Change); if the
        log was trimmed past `after`, moves.LogTrimmed."""
        return await self.moves.changes_since(shard, after, limit)

    async def shard_seq(self, shard: int) -> int:
        """The sequence number of `shard`'s newest change."""
        return await self.copies.run(lambda: self.copies.store(shard).last_seq())

    async def receive_shard(self, shard: int, source: str) -> dict[str, Any]:
        """Copy `shard` from node `source` (a snapshot, its index, the log after it) without
        owning it yet: {"shard", "seq", "bytes", "memories", "seconds", "copy_seconds", "index_seconds"}."""
        self._start()
        return await self.moves.receive(shard, source)

    async def fence(self, shard: int) -> int:
        """Refuse new writes to `shard` (NotOwnedError, retry), wait for those in flight; its last seq."""
        return await self.moves.fence(shard)

    async def catch_up(self, shard: int, source: str) -> int:
        """Apply what `source` wrote to `shard` since the copy (final once it is fenced); the seq reached."""
        return await self.moves.catch_up(shard, source)

    async def adopt(self, shard: int) -> None:
        """Own the received copy of `shard`: it is served here from now on (as the primary or a
        follower copy, as the placement says)."""
        await self.moves.adopt(shard)
        self.replication.sync(force=True)

    async def release(self, shard: int) -> None:
        """Drop `shard`, now owned elsewhere: requests for it raise NotOwnedError, its folder goes."""
        await self.moves.release(shard)

    async def abort_incoming(self, shard: int) -> None:
        """Undo `receive_shard`: delete the copy of `shard` received here (idempotent)."""
        await self.moves.abort(shard)

    async def unfence(self, shard: int) -> None:
        """Undo `fence`: writes to `shard` resume here, its move's log pin is released (idempotent)."""
        await self.moves.unfence(shard)

    # ---- shard splits (node.splits) --------------------------------------------------------------

    async def prepare_split(self, shard: int, after: Placement) -> dict[str, Any]:
        """Copy `shard`, the primary here, into the two halves `after` gives it and a new shard,
        while it serves: {"shard", "child", "seq", "bytes", "memories", "entities", "copy_seconds", "seconds"}."""
        self._start()
        return await self.splits.prepare(shard, after)

    async def catch_up_split(self, shard: int) -> int:
        """Once `shard` is fenced: its last changes into the halves; the seq they reached."""
        return await self.splits.catch_up(shard)

    async def adopt_split(self, shard: int, after: Placement) -> None:
        """Serve the halves (the authority saved `after`): `shard` holds its half, the new shard the other."""
        await self.splits.adopt(shard, after)
        self._keep_placement()
        self.replication.sync(force=True)

    async def abort_split(self, shard: int) -> None:
        """Undo `prepare_split` (idempotent); the authority unfences the shard."""
        await self.splits.abort(shard)

    async def set_placement(self, placement: Placement, down: tuple[str, ...] = ()) -> int:
        """Take a newer placement (a higher epoch; an older one is ignored) as this node's view of
        where shards live, and of which copies here are primaries (they replicate to the followers
        it names). It never changes which shards this node holds. `down`: nodes the authority
        finds silent; writes stop waiting for follower copies there at once (after a failover the
        old primary is such a follower) instead of after `replica_timeout_s`. Returns the epoch in use."""
        if placement.epoch > self.copies.placement.epoch:
            self.copies.set_placement(placement)
            self._keep_placement()
            self.replication.sync()
        self.replication.mark_down(down)
        return self.copies.placement.epoch

    def _keep_placement(self) -> None:
        """Keep the placement this node last saw on its own disk: a head that lost its disk rebuilds
        the cluster's from these copies (node.control.authority)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            placement_file.save(placement_file.node_copy(self.data_dir), self.copies.placement)
        except OSError as exc:  # a full disk must not stop the node; the head's copy is the record
            log.warning("placement epoch %d not kept on %s: %s", self.copies.placement.epoch, self.name, exc)

    async def settle(self, placement: Placement, moving: tuple[int, ...] = ()) -> dict[str, list[int]]:
        """Finish what an authority that stopped left here (a new one calls this once per node it
        finds running): take its placement if newer, own the received copies it names here, drop
        the others, lift the fences of moves it no longer drives (`moving`: the shards it is moving
        now), and release copies it no longer names here (a move flipped before the old copy went)."""
        await self.set_placement(placement)
        adopted, dropped, unfenced, released = [], [], [], []
        for shard, inc in list(self.moves.incoming.items()):
            if shard in moving or inc.pin != MOVE_PIN:  # a re-seed is the primary's, not the authority's
                continue
            if inc.replica.store is not None and self.name in self.copies.placement.replicas[shard]:
                await self.adopt(shard)
                adopted.append(shard)
            else:
                await self.abort_incoming(shard)
                dropped.append(shard)
        for shard in sorted(set(self.splits.pending) - set(moving)):
            if self.splits.saved(shard):  # the authority that stopped had saved the split: finish it
                await self.adopt_split(shard, self.copies.placement)
                adopted.append(shard)
            else:
                await self.abort_split(shard)
                dropped.append(shard)
        for shard in sorted(self.copies.fenced() - set(moving)):
            await self.unfence(shard)
            unfenced.append(shard)
        for shard in sorted(set(self.copies.held) - set(moving)):
            if self.name not in self.copies.placement.replicas[shard]:
                await self.release(shard)
                released.append(shard)
        return {"adopted": adopted, "dropped": dropped, "unfenced": unfenced, "released": released}

    async def get_placement(self) -> Placement:
        return self.copies.placement

    # ---- replicas (node.replication): the follower's side, health and status ----------------------

    async def apply_changes(self, shard: int, changes: list, from_node: str, after: int | None = None) -> int:
        """Apply the primary `from_node`'s changes to this follower copy of `shard`; its seq after.
        `after`: the seq the changes follow (default: the first one's - 1). A copy behind it (a
        gap) applies nothing and answers its own seq, so the primary sends again from there.
        NotOwnedError if there is no copy here or this node is the shard's primary in its view."""
        self._start()
        start = after if after is not None else (changes[0].seq - 1 if changes else 0)

        def apply() -> int:
            self.copies.check_follower(shard, from_node)
            store = self.copies.store(shard)
            if store.last_seq() < start:
                return store.last_seq()
            store.apply(changes)
            return store.last_seq()

        self.indexer.wrote()
        seq = await self.copies.run(apply, busy="commit")
        self.indexer.committed()
        return seq

    async def copy_state(self, shard: int) -> tuple[int, str | None]:
        """(seq, digest of the change at seq or None) of the copy of `shard` here, for its primary
        to decide between sending it the changes it misses and re-seeding it; NotOwnedError if none."""

        return await self.copies.run(lambda: self.copies.store(shard).copy_state())

    async def reseed(self, shard: int, source: str) -> int:
        """Replace the copy of `shard` here with one of the primary `source`'s (a snapshot and the
        log after it, as `receive_shard`) and keep it as a follower copy; its seq."""
        self._start()
        return await self.moves.reseed(shard, source)

    async def ping(self, watch: bool = False) -> dict[str, Any]:
        """A cheap answer for health checks (on the event loop, no store thread, no model), with the
        live flag of each follower of the shards this node is primary of: the placement authority
        records a down one as behind (`Placement.behind`) before this node acknowledges writes
        without it, and forgets it once live again. `watch`: the caller is the authority, which does
        that from now on (a node no authority watches has no failover that could promote a follower)."""
        if not watch:
            return {"node": self.name, "epoch": self.copies.placement.epoch}
        self.replication.watched = True
        self._start()  # a restarted node catches its followers up without waiting for a client's request
        followers = {s: {f: link.live for f, link in links.items()} for s, links in self.replication.links.items()}
        return {"node": self.name, "epoch": self.copies.placement.epoch, "followers": followers}

    async def replication_status(self) -> dict[str, Any]:
        """Per shard here: its role, seq, and for a primary each follower's acked seq, live flag and
        lag; and the node's counters (writes that waited for followers, followers marked down, re-seeds)."""

        def seqs() -> dict[int, int | None]:
            # A copy on disk that nothing opened since the start (no request, no push yet) still has a seq.
            return {s: self.copies.store(s).last_seq() if self.copies.readable([s]) else None
                    for s in sorted(self.copies.held)}

        shards: dict[int, Any] = {}
        for s, seq in (await self.copies.run(seqs)).items():
            entry: dict[str, Any] = {"role": self.copies.role(s), "seq": seq}
            if entry["role"] == "primary":
                entry["followers"] = {f: link.status(seq) for f, link in self.replication.links.get(s, {}).items()}
            shards[s] = entry
        return {"node": self.name, "placement_epoch": self.copies.placement.epoch, "shards": shards,
                **self.replication.counters()}
