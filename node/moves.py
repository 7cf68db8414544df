"""Moving a shard between nodes while it serves: both nodes' sides of it (`Node`'s move methods).

The placement authority runs, per shard, on the target B and the source A:

1. `B.receive(s, A)`: B pulls a snapshot of s from A (A pins its log at the snapshot's sequence
   number first, so the changes after it stay until the move ends), copies it through Ray in
   chunks, checks its sha256, installs it (a staging folder renamed when complete), builds its
   vector index from the stored vectors and replays A's log after it. B does not own s yet.
2. `A.fence(s)`: A refuses new writes to s (NotOwnedError: retry) and waits for those already
   past their entry; reads go on. The copy on A is now final.
3. `B.catch_up(s, A)`: B replays what A wrote meanwhile.
4. `B.adopt(s)`: B owns s.
5. (the authority flips the placement and pushes it to every node)
6. `A.release(s)`: A drops s and deletes its folder.

Rollback of 1-4: `B.abort_incoming(s)` and `A.unfence(s)`, both idempotent. `Gate` is the
write fence; `Moves` the rest.

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
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from node.errors import NodeError, NotOwnedError

if TYPE_CHECKING:
    from node.service import Node
    from node.store import ShardStore

MOVE_PIN = "move"  # the source's log pin while a shard is copied away (one move per shard at a time)
CHUNK = 4 << 20  # snapshot bytes per Ray call
PAGE = 1000  # changes per Ray call when replaying the source's log
INDEX_BATCH = 256  # rows per store-thread call when indexing a received copy (queries run between)


class LogTrimmed(NodeError):
    """The source's change log no longer reaches back to the copy's sequence number: start over
    from a new snapshot."""


class Gate:
    """Per shard: whether its writes are fenced, and how many are in flight (counted from entry)."""

    def __init__(self) -> None:
        self.fenced: set[int] = set()
        self._inflight: Counter[int] = Counter()
        self._drained: dict[int, asyncio.Event] = {}

    def check(self, shards: Iterable[int]) -> None:
        for s in shards:
            if s in self.fenced:
                raise NotOwnedError(f"shard {s} is moving; retry")

    @contextmanager
    def writing(self, shards: Iterable[int]) -> Iterator[None]:
        """Hold `shards` open for one write; NotOwnedError at once if one of them is fenced."""
        shards = set(shards)
        self.check(shards)
        for s in shards:
            self._inflight[s] += 1
        try:
            yield
        finally:
            for s in shards:
                self._inflight[s] -= 1
                if self._inflight[s] <= 0:
                    del self._inflight[s]
                    drained = self._drained.pop(s, None)
                    if drained is not None:
                        drained.set()

    async def fence(self, shard: int) -> None:
        """Refuse new writes to `shard`, then wait until the ones in flight have finished."""
        self.fenced.add(shard)
        while self._inflight.get(shard):
            await self._drained.setdefault(shard, asyncio.Event()).wait()

    def unfence(self, shard: int) -> None:
        self.fenced.discard(shard)


@dataclass
class Incoming:
    """A copy of a shard being received: not owned, not indexed by the node's indexer, not served."""

    shard: int
    source: str
    store: ShardStore | None = None
    aborted: bool = False
    seq: int = 0
    pin: str = MOVE_PIN  # MOVE_PIN for a move the authority drives; a re-seed's own pin otherwise


def staging_dir(data_dir: Path, shard: int) -> Path:
    return Path(data_dir) / "shards" / f"{shard:04d}.incoming"


def clear_staging(data_dir: Path) -> None:
    """Remove the staging folders of copies a crash interrupted."""
    for path in (Path(data_dir) / "shards").glob("*.incoming"):
        shutil.rmtree(path, ignore_errors=True)


class Moves:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.gate = Gate()
        self.incoming: dict[int, Incoming] = {}
        clear_staging(node.data_dir)

    def state(self) -> dict[int, str]:
        """Shards being moved here or away (node stats)."""
        moving = {s: "receiving" if inc.store is None else "received" for s, inc in self.incoming.items()}
        return {**moving, **{s: "fenced" for s in self.gate.fenced}}

    # ---- the source ------------------------------------------------------------------------

    async def fence(self, shard: int) -> int:
        node = self.node
        if shard not in node.owned:
            raise NotOwnedError(f"shard {shard} is not owned by {node.name}")
        await self.gate.fence(shard)
        return await node._on_store(lambda: node._shard(shard).last_seq())

    async def unfence(self, shard: int) -> None:
        node = self.node
        self.gate.unfence(shard)

        def unpin() -> None:
            if shard in node.owned and shard in node.shards:
                node.shards[shard].pin_log(MOVE_PIN, None)

        await node._on_store(unpin)

    def _listed(self, shard: int) -> bool:
        """Whether this node's placement lists it among `shard`'s copies (primary or follower)."""
        node = self.node
        return shard < node.placement.shards and node.name in node.placement.replicas[shard]

    async def release(self, shard: int) -> None:
        """Drop `shard` (its new holder has it and the placement says so); idempotent."""
        node = self.node
        if shard in node.owned and self._listed(shard):
            raise NodeError(f"{node.name} will not release shard {shard}: its placement (epoch "
                            f"{node.placement.epoch}) still names it the owner or a copy")
        await self._disown(shard)
        self.gate.unfence(shard)

    async def _disown(self, shard: int) -> None:
        """Stop serving `shard` here and delete its folder."""
        node = self.node

        def drop() -> None:
            node.owned.discard(shard)
            store = node.shards.pop(shard, None)
            if store is not None:
                store.close()
            node.vector_cache.drop_shard(shard)

        await node._on_store(drop)
        await _in_thread(shutil.rmtree, node.shard_root(shard), True)

    async def changes_since(self, shard: int, after: int, limit: int) -> list:
        def read() -> list:
            store = self.node._shard(shard)
            trimmed = store.trimmed_to()
            if trimmed > after:
                raise LogTrimmed(f"shard {shard}: the change log of {self.node.name} was trimmed up to "
                                 f"seq {trimmed}, past {after}; the copy must start from a new snapshot")
            return store.changes_since(after, limit)

        return await self.node._on_store(read)

    # ---- the target ------------------------------------------------------------------------

    async def receive(self, shard: int, source: str, pin: str = MOVE_PIN) -> dict[str, Any]:
        node = self.node
        if shard in node.owned:
            raise NodeError(f"{node.name} owns shard {shard} already")
        await self.abort(shard)  # an earlier attempt, or a stale copy from an earlier placement
        inc = self.incoming[shard] = Incoming(shard, source, pin=pin)
        peer = node.peer(source)
        started = time.monotonic()
        try:
            size = await self._copy(inc, peer, pin)
            copied = time.monotonic()
            while await node._on_store(inc.store.index_pending, INDEX_BATCH, busy="index"):
                self._alive(inc)
            indexed = time.monotonic()
            seq = await self._replay(inc, peer)
            memories = await node._on_store(lambda: inc.store.db.execute("SELECT COUNT(*) FROM memories").fetchone()[0])
        except BaseException:
            await self._discard(inc)
            if self.incoming.get(shard) is inc or (shard not in self.incoming and shard not in node.owned):
                self.incoming.pop(shard, None)
                await _in_thread(shutil.rmtree, node.shard_root(shard), True)
            await _in_thread(shutil.rmtree, staging_dir(node.data_dir, shard), True)
            raise
        return {"shard": shard, "seq": seq, "bytes": size, "memories": memories,
                "seconds": round(time.monotonic() - started, 3), "copy_seconds": round(copied - started, 3),
                "index_seconds": round(indexed - copied, 3)}

    async def _copy(self, inc: Incoming, peer: Any, pin: str) -> int:
        """Copy the source's snapshot of the shard into place and open it; its size in bytes."""
        node, shard = self.node, inc.shard
        snap = await peer.snapshot.remote(shard, pin)
        staging = staging_dir(node.data_dir, shard)
        try:
            await _in_thread(_fresh_folder, staging)
            digest = hashlib.sha256()
            with open(staging / "store.sqlite3", "wb") as f:
                for offset in range(0, snap["bytes"], CHUNK):
                    data = await peer.read_snapshot.remote(snap["id"], offset, CHUNK)
                    self._alive(inc)
                    if not data:
                        raise NodeError(f"shard {shard}: the snapshot from {inc.source} ended at {offset} of "
                                        f"{snap['bytes']} bytes")
                    digest.update(data)
                    await _in_thread(f.write, data)
                await _in_thread(_sync, f)
            if digest.hexdigest() != snap["sha256"]:
                raise NodeError(f"shard {shard}: the copy from {inc.source} does not match its sha256")
        finally:
            await peer.drop_snapshot.remote(snap["id"])
        self._alive(inc)
        await _in_thread(_replace_folder, staging, node.shard_root(shard))
        inc.store = await node._on_store(node._open_store, shard)
        self._alive(inc)
        return int(snap["bytes"])

    async def _replay(self, inc: Incoming, peer: Any) -> int:
        """Apply the source's changes after the copy's sequence number, up to (at least) the
        source's last one when this started; the copy numbers its own changes after it."""
        node, shard = self.node, inc.shard
        target = await peer.shard_seq.remote(shard)
        after = await node._on_store(inc.store.last_seq)
        while True:
            changes = await peer.changes_since.remote(shard, after, PAGE)
            self._alive(inc)
            if changes:
                await node._on_store(inc.store.apply, changes, busy="commit")
                after = changes[-1].seq
            if len(changes) < PAGE:
                break
        await node._on_store(inc.store.advance_seq, target)
        inc.seq = await node._on_store(inc.store.last_seq)
        return inc.seq

    async def catch_up(self, shard: int, source: str) -> int:
        inc = self.incoming.get(shard)
        if inc is None or inc.store is None:
            raise NodeError(f"{self.node.name} has received no copy of shard {shard} to bring up to date")
        return await self._replay(inc, self.node.peer(source))

    async def adopt(self, shard: int) -> None:
        """Own the received copy: requests for the shard are served here from now on."""
        node = self.node
        inc = self.incoming.get(shard)
        if inc is None or inc.store is None:
            if shard in node.owned:
                return
            raise NodeError(f"{node.name} has received no copy of shard {shard} to adopt")

        def own() -> None:
            node.vector_cache.drop_shard(shard)
            node.shards[shard] = inc.store
            node.owned.add(shard)

        await node._on_store(own)
        del self.incoming[shard]

    async def reseed(self, shard: int, source: str) -> int:
        """Drop the follower copy of `shard` here and receive a new one from its primary `source`
        (which holds the log pin `reseed-<this node>` meanwhile and releases it); its seq."""
        from node.replication import reseed_pin

        node = self.node
        if shard < node.placement.shards and node.placement.owner[shard] == node.name:
            raise NodeError(f"{node.name} will not re-seed shard {shard}: its placement (epoch "
                            f"{node.placement.epoch}) names it the primary")
        if shard in self.incoming:
            raise NodeError(f"{node.name} is receiving shard {shard} already")
        await self._disown(shard)
        node._peers.pop(source, None)  # the primary may be a new actor since this node last called it
        info = await self.receive(shard, source, reseed_pin(node.name))
        await self.adopt(shard)
        return info["seq"]

    async def abort(self, shard: int) -> None:
        """Forget a copy being received (or received, or adopted while the placement still names
        another node) and delete it; idempotent."""
        node = self.node
        inc = self.incoming.pop(shard, None)
        if inc is not None:
            inc.aborted = True
            await self._discard(inc)
        if shard in node.owned:
            if self._listed(shard):
                raise NodeError(f"{node.name} will not drop shard {shard}: its placement (epoch "
                                f"{node.placement.epoch}) names it the owner or a copy")
            await self._disown(shard)
        await _in_thread(shutil.rmtree, staging_dir(node.data_dir, shard), True)
        await _in_thread(shutil.rmtree, node.shard_root(shard), True)

    async def _discard(self, inc: Incoming) -> None:
        store, inc.store = inc.store, None
        if store is not None:
            await self.node._on_store(store.close)

    @staticmethod
    def _alive(inc: Incoming) -> None:
        if inc.aborted:
            raise NodeError(f"receiving shard {inc.shard} was aborted")


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _replace_folder(staging: Path, final: Path) -> None:
    """Put the complete copy where the shard lives, replacing a stale one."""
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
