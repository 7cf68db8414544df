"""Splitting a shard in two while it serves: the primary's side (`Node`'s split methods).

The placement authority (node.control.splitting) runs, on the node P that holds shard s's primary,
with `after` the placement in which s is split (`Placement.with_split`: s keeps the entities whose
next hash bit is 0, a new shard c the others):

1. `P.prepare_split(s, after)`: P pins s's change log, snapshots s, and makes two copies of the
   snapshot in staging folders (`shards/NNNN.split`, s's half, and `CCCC.split`, c's), each without
   the other half's rows (node.store.split); it builds each one's vector index from the stored
   vectors, then replays s's log after the snapshot into them, each change into the half its
   entity (or free-form id) now belongs to. s serves all along.
2. `P.fence(s)` (node.moves): new writes to s are refused (routers retry); reads go on from s.
3. `P.catch_up_split(s)`: the last changes, the same way; together the halves hold all of s.
   Each is marked complete on disk.
4. The authority saves `after` (the point of no return), then `P.adopt_split(s, after)`: in one
   store-thread turn P takes `after` as its view, puts s's half in s's folder and serves c; then
   s is unfenced. A router whose placement predates the split is refused (an entity now on the
   other shard, or a shard list from a placement with fewer shards: `ShardSet.check_entity`,
   `check_shard_count`) and sends the request again after reading the placement.

Rollback before 4: `P.abort_split(s)` (staging folders and log pin dropped) and `P.unfence(s)`.
A node that stops between 4's save and its adoption finishes the swap when it starts again
(`finish_on_disk`: the placement it starts with has the split and the halves were complete);
otherwise the staging folders of an unfinished split are deleted at start.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import node.store.changelog as changelog
from node.control.placement import Placement
from node.errors import NodeError
from node.moves import fresh_folder, in_thread, replace_folder
from node.replica import Replica, ReplicaState
from node.shard_set import ShardSet
from node.store import ShardStore
from node.store.split import keep_half
from node.tuning import MOVE_INDEX_BATCH, MOVE_LOG_PAGE
from node.vector_cache import VectorCache

SPLIT_PIN = "split"  # the shard's log pin while it is split (one split per shard at a time)
COMPLETE = "complete.json"  # in a half's staging folder once it holds all of its half


def staging_dir(data_dir: Path, shard: int) -> Path:
    return Path(data_dir) / "shards" / f"{shard:04d}.split"


@dataclass
class Halves:
    """A split being prepared: the two halves' stores, open on their staging folders."""

    shard: int
    child: int
    after: Placement
    seq: int  # the last change of the shard replayed into the halves
    stores: dict[int, ShardStore] = field(default_factory=dict)
    aborted: bool = False

    def half_of(self, change: changelog.Change) -> int:
        """The half a change of the shard belongs to: by its free-form id's home, or its entity."""
        if change.op in (changelog.HOME, changelog.UNHOME, changelog.FORGET):
            return self.after.id_home(change.key)
        return self.after.shard_of(change.key if change.op == changelog.ERASE else change.entity_id)


class Splits:
    def __init__(self, shards: ShardSet, vector_cache: VectorCache,
                 open_store: Callable[[int, Path], ShardStore]) -> None:
        self.shards = shards
        self.vector_cache = vector_cache
        self.open_store = open_store  # (shard, folder) -> its store, on the store thread
        self.pending: dict[int, Halves] = {}
        finish_on_disk(shards.data_dir, shards.placement, shards.name)

    def state(self) -> dict[int, str]:
        """Shards being split here (node stats)."""
        return {s: f"splitting into {s} and {h.child}" for s, h in self.pending.items()}

    async def prepare(self, shard: int, after: Placement) -> dict[str, Any]:
        shards = self.shards
        child = after.shards - 1
        if not shards.is_primary(shard) or after.owner[child] != shards.name or after.shards != shards.placement.shards + 1:
            raise NodeError(f"{shards.name} cannot split shard {shard}: it is not its primary, or the split "
                            f"placement (epoch {after.epoch}) is not the next of its view (epoch {shards.placement.epoch})")
        await self.abort(shard)
        started = time.monotonic()
        store = await shards.run(shards.store, shard)
        await shards.run(lambda: store.pin_log(SPLIT_PIN, store.last_seq()))
        halves = self.pending[shard] = Halves(shard, child, after, 0)
        try:
            folders = {s: staging_dir(shards.data_dir, s) for s in (shard, child)}
            for folder in folders.values():
                await in_thread(fresh_folder, folder)
            snap = await in_thread(store.snapshot, folders[shard] / "store.sqlite3")
            halves.seq = snap["seq"]
            await in_thread(shutil.copyfile, folders[shard] / "store.sqlite3", folders[child] / "store.sqlite3")
            kept = {}
            for s, folder in folders.items():
                kept[s] = await in_thread(keep_half, folder / "store.sqlite3", s,
                                           lambda e, s=s: after.shard_of(e) == s, lambda m, s=s: after.id_home(m) == s)
                self._alive(halves)
                halves.stores[s] = await shards.run(self.open_store, s, folder)
                while await shards.run(halves.stores[s].index_pending, MOVE_INDEX_BATCH, busy="index"):
                    self._alive(halves)
            copied = time.monotonic()
            await self._replay(halves)
        except BaseException:
            await self.abort(shard, halves)
            raise
        return {"shard": shard, "child": child, "seq": halves.seq, "bytes": snap["bytes"],
                "memories": {str(s): k["memories"] for s, k in kept.items()},
                "entities": {str(s): k["entities"] for s, k in kept.items()},
                "copy_seconds": round(copied - started, 3), "seconds": round(time.monotonic() - started, 3)}

    async def _replay(self, halves: Halves) -> None:
        """Apply the shard's changes after `halves.seq`, each to its half, up to its last one now."""
        shards = self.shards
        store = shards.store(halves.shard)
        while True:
            changes = await shards.run(store.changes_since, halves.seq, MOVE_LOG_PAGE)
            self._alive(halves)
            by_half: dict[int, list[changelog.Change]] = {s: [] for s in halves.stores}
            for change in changes:
                by_half[halves.half_of(change)].append(change)
            for s, part in by_half.items():
                if part:
                    await shards.run(halves.stores[s].apply, part, busy="commit")
            if changes:
                halves.seq = changes[-1].seq
            if len(changes) < MOVE_LOG_PAGE:
                return

    async def catch_up(self, shard: int) -> int:
        """After the fence: the last changes into the halves, both numbered on from the shard's last
        sequence number, and marked complete on disk; that number."""
        halves = self.pending.get(shard)
        if halves is None:
            raise NodeError(f"{self.shards.name} is not splitting shard {shard}")
        await self._replay(halves)
        seq = await self.shards.run(lambda: self.shards.store(shard).last_seq())
        for s, store in halves.stores.items():
            await self.shards.run(store.advance_seq, seq)
            marker = {"shard": shard, "child": halves.child, "epoch": halves.after.epoch, "seq": seq}
            await in_thread(_write_marker, staging_dir(self.shards.data_dir, s), marker)
        return seq

    async def adopt(self, shard: int, after: Placement) -> None:
        """Serve the halves (the authority has saved `after`): one store-thread turn, so no request
        sees the shard half-swapped."""
        shards = self.shards
        halves = self.pending.get(shard)
        if halves is None:
            if shards.placement.epoch >= after.epoch and after.shards - 1 in shards.held:
                return  # adopted already
            raise NodeError(f"{shards.name} has no split of shard {shard} to adopt")

        if shard in shards.replicas:
            shards.replicas[shard].close_links()

        def swap() -> None:
            if after.epoch > shards.placement.epoch:
                shards.set_placement(after)
            shards.drop(shard)
            for s, store in halves.stores.items():
                store.close()
                _replace_folder(staging_dir(shards.data_dir, s), shards.root(s))
                replica = Replica(s, ReplicaState.RECEIVING)
                replica.store = self.open_store(s, shards.root(s))
                shards.add(replica)
                self.vector_cache.drop_shard(s)

        await shards.run(swap)
        del self.pending[shard]

    def saved(self, shard: int) -> bool:
        """Whether the split of `shard` being prepared here is complete and this node's view has it
        (the authority saved it): it is to be adopted, not dropped."""
        halves = self.pending.get(shard)
        view = self.shards.placement
        return (halves is not None and _read_marker(staging_dir(self.shards.data_dir, shard)) is not None
                and view.epoch >= halves.after.epoch and view.shards > halves.child
                and view.ranges[halves.child] == halves.after.ranges[halves.child])

    async def abort(self, shard: int, halves: Halves | None = None) -> None:
        """Forget a split of `shard` being prepared here: its halves and the log pin go (idempotent)."""
        halves = halves or self.pending.get(shard)
        if self.pending.get(shard) is halves:
            self.pending.pop(shard, None)
        shards = self.shards
        if halves is not None:
            halves.aborted = True
            for store in halves.stores.values():
                await shards.run(store.close)
            halves.stores.clear()
            await in_thread(shutil.rmtree, staging_dir(shards.data_dir, halves.child), True)
        await in_thread(shutil.rmtree, staging_dir(shards.data_dir, shard), True)
        if shard in shards.replicas:
            await shards.run(shards.replicas[shard].pin_log, SPLIT_PIN, None)

    @staticmethod
    def _alive(halves: Halves) -> None:
        if halves.aborted:
            raise NodeError(f"the split of shard {halves.shard} was aborted")


def finish_on_disk(data_dir: Path, placement: Placement, name: str) -> None:
    """At start: finish a split whose placement was saved before this node adopted it (the halves
    were complete, the placement has the split and names this node), drop any other split's staging."""
    for path in sorted((Path(data_dir) / "shards").glob("*.split")):
        marker = _read_marker(path)  # written once both halves held all (the authority saves only after)
        if marker is not None and placement.epoch >= marker["epoch"] and placement.shards > marker["child"] and \
                name in placement.replicas[int(path.name.split(".")[0])]:
            _replace_folder(path, path.with_suffix(""))
        else:
            shutil.rmtree(path, ignore_errors=True)


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(folder: Path, marker: dict) -> None:
    from node.control.placement_file import write_json

    write_json(folder / COMPLETE, marker)


def _replace_folder(staging: Path, final: Path) -> None:
    """Put the half where its shard lives (the shard's whole copy, or a stale folder, goes)."""
    (staging / COMPLETE).unlink(missing_ok=True)
    replace_folder(staging, final)
