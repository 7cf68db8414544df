"""The shard copies a node holds, and the one place that says which it serves, may write and may read.

A node holds a copy of each shard its placement view names it for (`held`); the copy is its
shard's primary when the view names this node first, a follower otherwise. Requests are checked
here and nowhere else:

- serve (read): a held copy, primary or follower (`readable`); with no shard named, the primaries;
- write: a held primary copy whose write fence is down (`check_writable`, `Gate`); a follower
  copy takes writes only from its primary (`check_follower`, node.replication);
- any other shard: NotOwnedError (the caller's placement is stale, or the shard moved: retry).

Copies change hands only through `add` (a received copy adopted, node.moves) and `drop` (a copy
released or re-seeded), both on the store thread, which is also where the stores are used.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from node.control.placement import Placement
from node.errors import NotOwnedError
from node.store import ShardStore
from node.store_thread import StoreThread


def shard_dir(data_dir: str | Path, shard: int) -> Path:
    return Path(data_dir) / "shards" / f"{shard:04d}"


class Gate:
    """Per shard: whether its writes are fenced (by a move), and how many are in flight (counted from entry)."""

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


class ShardSet:
    def __init__(self, name: str, data_dir: Path, held: Iterable[int], placement: Placement,
                 store_thread: StoreThread, open_store: Callable[[int], ShardStore]) -> None:
        self.name = name
        self.data_dir = data_dir
        self.held = set(held)  # changed on the store thread only (add, drop), which reads it too
        self.stores: dict[int, ShardStore] = {}  # the held copies opened so far
        self.placement = placement  # this node's view (Node.set_placement)
        self.gate = Gate()
        self.store_thread = store_thread
        self.open_store = open_store  # opens (or creates) a shard's folder here, held or not

    async def run(self, fn, *args, busy: str | None = None):
        """Run `fn(*args)` on the store thread, where every store is used."""
        return await self.store_thread.run(fn, *args, busy=busy)

    def root(self, shard: int) -> Path:
        return shard_dir(self.data_dir, shard)

    # ---- which copies, in which role --------------------------------------------------------------

    def check_held(self, shard: int) -> None:
        if shard not in self.held:
            raise NotOwnedError(f"shard {shard} is not owned by {self.name}")

    def store(self, shard: int) -> ShardStore:
        """The held copy of `shard`, opened (or created) on first use; NotOwnedError if not held."""
        self.check_held(shard)
        store = self.stores.get(shard)
        if store is None:
            store = self.stores[shard] = self.open_store(shard)
        return store

    def on_disk(self, shard: int) -> bool:
        """Whether the held copy of `shard` exists on disk (opening it if so)."""
        if (self.root(shard) / "store.sqlite3").exists():
            self.store(shard)
            return True
        return False

    def is_primary(self, shard: int) -> bool:
        """Whether this node holds `shard`'s primary copy, by its placement view."""
        return shard in self.held and self.placement.owner[shard] == self.name

    def role(self, shard: int) -> str:
        return "primary" if self.is_primary(shard) else "follower"

    def primaries(self) -> set[int]:
        return {s for s in self.held if self.is_primary(s)}

    def listed(self, shard: int) -> bool:
        """Whether the placement view names this node among `shard`'s copies (primary or follower)."""
        return shard < self.placement.shards and self.name in self.placement.replicas[shard]

    def readable(self, shards: list[int] | None) -> list[int]:
        """Shards to read: the given ones that exist here (primary or follower copies), or every
        open one this node is the primary of. A given shard not held here is NotOwnedError, never
        an empty answer."""
        if shards is None:
            return sorted(s for s in self.stores if self.is_primary(s))
        for s in shards:
            self.check_held(s)
        return [s for s in shards if s in self.stores or self.on_disk(s)]

    def check_writable(self, shards: Iterable[int]) -> set[int]:
        """NotOwnedError unless this node holds the primary copy of every shard and none is fenced
        by a move: a follower copy takes writes only from its primary (`check_follower`)."""
        shards = set(shards)
        for s in shards:
            self.check_held(s)
            if self.placement.owner[s] != self.name:
                raise NotOwnedError(f"shard {s}: this node holds a follower copy; writes go to the primary")
        self.gate.check(shards)
        return shards

    def check_follower(self, shard: int, primary: str) -> None:
        """NotOwnedError unless the copy of `shard` here is a follower (of `primary`) by this view."""
        self.check_held(shard)
        if self.placement.owner[shard] == self.name:
            raise NotOwnedError(f"shard {shard}: {self.name} is its primary (placement epoch "
                                f"{self.placement.epoch}), not a follower of {primary}")

    # ---- copies changing hands (on the store thread) ------------------------------------------------

    def add(self, shard: int, store: ShardStore) -> None:
        """Hold `store` as this node's copy of `shard` (a received copy adopted)."""
        self.stores[shard] = store
        self.held.add(shard)

    def drop(self, shard: int) -> None:
        """Stop holding `shard` here and close its store (its folder is the caller's)."""
        self.held.discard(shard)
        store = self.stores.pop(shard, None)
        if store is not None:
            store.close()
