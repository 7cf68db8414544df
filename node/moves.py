"""Moving a shard between nodes while it serves: both nodes' sides of it (`Node`'s move methods).

The placement authority runs, per shard, on the target B and the source A:

1. `B.receive(s, A)`: B pulls a snapshot of s from A (A pins its log at the snapshot's sequence
   number first, so the changes after it stay until the move ends), copies it through Ray in
   chunks, checks its sha256, installs it (a staging folder renamed when complete), builds its
   vector index from the stored vectors and replays A's log after it. B does not own s yet:
   its copy is a RECEIVING replica (node.replica).
2. `A.fence(s)`: A refuses new writes to s (NotOwnedError: retry) and waits for those already
   past their entry; reads go on. The copy on A is now final (FENCED).
3. `B.catch_up(s, A)`: B replays what A wrote meanwhile.
4. `B.adopt(s)`: B owns s (its replica a PRIMARY or FOLLOWER, as its placement view says).
5. (the authority flips the placement and pushes it to every node)
6. `A.release(s)`: A drops s and deletes its folder (RELEASED).

Rollback of 1-4: `B.abort_incoming(s)` and `A.unfence(s)`, both idempotent. The write fence is
the shard set's `Gate` (node.shard_set); `Moves` does the rest.

With replicas the same steps move one copy: a node that receives and adopts a follower copy is
sent the primary's writes from its own seq once the primary's placement names it
(node.replication), and `reseed` replaces a follower copy its primary cannot bring up to date from
its log with a new one received the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.names import Handles
from node.replica import Replica, ReplicaState
from node.shard_set import Gate, ShardSet
from node.vector_cache import VectorCache
from node.tuning import MOVE_SNAPSHOT_CHUNK_BYTES, MOVE_LOG_PAGE, MOVE_INDEX_BATCH

MOVE_PIN = "move"  # the source's log pin while a shard is copied away (one move per shard at a time)


class LogTrimmed(NodeError):
    """The source's change log no longer reaches back to the copy's sequence number: start over
    from a new snapshot."""


@dataclass
class Incoming:
    """A copy of a shard being received: a RECEIVING replica, not indexed by the node's indexer,
    not served; `shards.add` holds it once adopted."""

    shard: int
    source: str
    aborted: bool = False
    seq: int = 0
    pin: str = MOVE_PIN  # MOVE_PIN for a move the authority drives; a re-seed's own pin otherwise
    replica: Replica = field(init=False)

    def __post_init__(self) -> None:
        self.replica = Replica(self.shard, ReplicaState.RECEIVING)


def staging_dir(data_dir: Path, shard: int) -> Path:
    return Path(data_dir) / "shards" / f"{shard:04d}.incoming"


def clear_staging(data_dir: Path) -> None:
    """Remove the staging folders of copies a crash interrupted."""
    for path in (Path(data_dir) / "shards").glob("*.incoming"):
        shutil.rmtree(path, ignore_errors=True)


def reseed_pin(follower: str) -> str:
    """The log pin a primary holds while `follower` is re-seeded from it (`Moves.reseed`)."""
    return f"reseed-{follower}"


class Moves:
    def __init__(self, shards: ShardSet, handles: Handles, vector_cache: VectorCache) -> None:
        self.shards = shards
        self.handles = handles
        self.vector_cache = vector_cache
        self.incoming: dict[int, Incoming] = {}
        clear_staging(shards.data_dir)

    @property
    def gate(self) -> Gate:
        """The shard set's write fence, which a move raises on its source."""
        return self.shards.gate

    def state(self) -> dict[int, str]:
        """Shards being moved here or away (node stats)."""
        moving = {s: "receiving" if inc.replica.store is None else "received" for s, inc in self.incoming.items()}
        return {**moving, **{s: "fenced" for s in self.gate.fenced}}

    # ---- the source ------------------------------------------------------------------------

    async def fence(self, shard: int) -> int:
        await self.shards.fence(shard)
        return await self.shards.run(lambda: self.shards.store(shard).last_seq())

    async def unfence(self, shard: int) -> None:
        shards = self.shards
        shards.unfence(shard)

        def unpin() -> None:
            if shard in shards.replicas:
                shards.replicas[shard].pin_log(MOVE_PIN, None)

        await shards.run(unpin)

    async def release(self, shard: int) -> None:
        """Drop `shard` (its new holder has it and the placement says so); idempotent."""
        shards = self.shards
        if shard in shards.held and shards.listed(shard):
            raise NodeError(f"{shards.name} will not release shard {shard}: its placement (epoch "
                            f"{shards.placement.epoch}) still names it the owner or a copy")
        await self._disown(shard)
        self.shards.unfence(shard)

    async def _disown(self, shard: int) -> None:
        """Stop serving `shard` here and delete its folder."""
        if shard in self.shards.replicas:
            self.shards.replicas[shard].close_links()

        def drop() -> None:
            self.shards.drop(shard)
            self.vector_cache.drop_shard(shard)

        await self.shards.run(drop)
        await in_thread(shutil.rmtree, self.shards.root(shard), True)

    async def changes_since(self, shard: int, after: int, limit: int) -> list:
        def read() -> list:
            store = self.shards.store(shard)
            trimmed = store.trimmed_to()
            if trimmed > after:
                raise LogTrimmed(f"shard {shard}: the change log of {self.shards.name} was trimmed up to "
                                 f"seq {trimmed}, past {after}; the copy must start from a new snapshot")
            return store.changes_since(after, limit)

        return await self.shards.run(read)

    # ---- the target ------------------------------------------------------------------------

    async def receive(self, shard: int, source: str, pin: str = MOVE_PIN) -> dict[str, Any]:
        shards = self.shards
        if shard in shards.held:
            raise NodeError(f"{shards.name} owns shard {shard} already")
        await self.abort(shard)  # an earlier attempt, or a stale copy from an earlier placement
        inc = self.incoming[shard] = Incoming(shard, source, pin=pin)
        peer = self.handles.get(source)
        started = time.monotonic()
        try:
            size = await self._copy(inc, peer, pin)
            copied = time.monotonic()
            while await shards.run(inc.replica.store.index_pending, MOVE_INDEX_BATCH, busy="index"):
                self._alive(inc)
            indexed = time.monotonic()
            seq = await self._replay(inc, peer)
            memories = await shards.run(lambda: inc.replica.store.db.execute("SELECT COUNT(*) FROM memories").fetchone()[0])
        except BaseException:
            await self._discard(inc)
            if self.incoming.get(shard) is inc or (shard not in self.incoming and shard not in shards.held):
                self.incoming.pop(shard, None)
                await in_thread(shutil.rmtree, shards.root(shard), True)
            await in_thread(shutil.rmtree, staging_dir(shards.data_dir, shard), True)
            raise
        return {"shard": shard, "seq": seq, "bytes": size, "memories": memories,
                "seconds": round(time.monotonic() - started, 3), "copy_seconds": round(copied - started, 3),
                "index_seconds": round(indexed - copied, 3)}

    async def _copy(self, inc: Incoming, peer: Any, pin: str) -> int:
        """Copy the source's snapshot of the shard into place and open it; its size in bytes."""
        shards, shard = self.shards, inc.shard
        snap = await peer.snapshot.remote(shard, pin)
        staging = staging_dir(shards.data_dir, shard)
        try:
            await in_thread(fresh_folder, staging)
            digest = hashlib.sha256()
            with open(staging / "store.sqlite3", "wb") as f:
                for offset in range(0, snap["bytes"], MOVE_SNAPSHOT_CHUNK_BYTES):
                    data = await peer.read_snapshot.remote(snap["id"], offset, MOVE_SNAPSHOT_CHUNK_BYTES)
                    self._alive(inc)
                    if not data:
                        raise NodeError(f"shard {shard}: the snapshot from {inc.source} ended at {offset} of "
                                        f"{snap['bytes']} bytes")
                    digest.update(data)
                    await in_thread(f.write, data)
                await in_thread(_sync, f)
            if digest.hexdigest() != snap["sha256"]:
                raise NodeError(f"shard {shard}: the copy from {inc.source} does not match its sha256")
        finally:
            await peer.drop_snapshot.remote(snap["id"])
        self._alive(inc)
        await in_thread(replace_folder, staging, shards.root(shard))
        inc.replica.store = await shards.run(shards.open_store, shard)
        self._alive(inc)
        return int(snap["bytes"])

    async def _replay(self, inc: Incoming, peer: Any) -> int:
        """Apply the source's changes after the copy's sequence number, up to (at least) the
        source's last one when this started; the copy numbers its own changes after it."""
        shards, shard = self.shards, inc.shard
        target = await peer.shard_seq.remote(shard)
        after = await shards.run(inc.replica.store.last_seq)
        while True:
            changes = await peer.changes_since.remote(shard, after, MOVE_LOG_PAGE)
            self._alive(inc)
            if changes:
                await shards.run(inc.replica.store.apply, changes, busy="commit")
                after = changes[-1].seq
            if len(changes) < MOVE_LOG_PAGE:
                break
        await shards.run(inc.replica.store.advance_seq, target)
        inc.seq = await shards.run(inc.replica.store.last_seq)
        return inc.seq

    async def catch_up(self, shard: int, source: str) -> int:
        inc = self.incoming.get(shard)
        if inc is None or inc.replica.store is None:
            raise NodeError(f"{self.shards.name} has received no copy of shard {shard} to bring up to date")
        return await self._replay(inc, self.handles.get(source))

    async def adopt(self, shard: int) -> None:
        """Own the received copy: requests for the shard are served here from now on."""
        shards = self.shards
        inc = self.incoming.get(shard)
        if inc is None or inc.replica.store is None:
            if shard in shards.held:
                return
            raise NodeError(f"{shards.name} has received no copy of shard {shard} to adopt")

        def own() -> None:
            self.vector_cache.drop_shard(shard)
            shards.add(inc.replica)

        await shards.run(own)
        del self.incoming[shard]

    async def reseed(self, shard: int, source: str) -> int:
        """Drop the follower copy of `shard` here and receive a new one from its primary `source`
        (which holds the log pin `reseed-<this node>` meanwhile and releases it); its seq."""
        shards = self.shards
        if shard < shards.placement.shards and shards.placement.owner[shard] == shards.name:
            raise NodeError(f"{shards.name} will not re-seed shard {shard}: its placement (epoch "
                            f"{shards.placement.epoch}) names it the primary")
        if shard in self.incoming:
            raise NodeError(f"{shards.name} is receiving shard {shard} already")
        await self._disown(shard)
        self.handles.forget(source)  # the primary may be a new actor since this node last called it
        info = await self.receive(shard, source, reseed_pin(shards.name))
        await self.adopt(shard)
        return info["seq"]

    async def abort(self, shard: int) -> None:
        """Forget a copy being received (or received, or adopted while the placement still names
        another node) and delete it; idempotent."""
        shards = self.shards
        inc = self.incoming.pop(shard, None)
        if inc is not None:
            inc.aborted = True
            await self._discard(inc)
        if shard in shards.held:
            if shards.listed(shard):
                raise NodeError(f"{shards.name} will not drop shard {shard}: its placement (epoch "
                                f"{shards.placement.epoch}) names it the owner or a copy")
            await self._disown(shard)
        await in_thread(shutil.rmtree, staging_dir(shards.data_dir, shard), True)
        await in_thread(shutil.rmtree, shards.root(shard), True)

    async def _discard(self, inc: Incoming) -> None:
        await self.shards.run(inc.replica.close)

    @staticmethod
    def _alive(inc: Incoming) -> None:
        if inc.aborted:
            raise NodeError(f"receiving shard {inc.shard} was aborted")


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def replace_folder(staging: Path, final: Path) -> None:
    """Put the complete copy where the shard lives, replacing a stale one."""
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
