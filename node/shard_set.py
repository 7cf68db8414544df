"""The shard copies a node holds, and the one place that says which it serves, may write and may read.

A node holds a copy of each shard its placement view names it for (`held`); the copy is its
shard's primary when the view names this node first, a follower otherwise. Requests are checked
here and nowhere else:

- serve (read): a held copy, primary or follower (`readable`); with no shard named, the primaries;
- write: a held primary copy whose write fence is down (`check_writable`, `Gate`); a follower
  copy takes writes only from its primary (`check_follower`, node.replication);
- any other shard: NotOwnedError (the caller's placement is stale, or the shard moved: retry).

Each held copy is a `Replica` (node.replica: its state, store, log pins and follower links).
Copies change hands only through `add` (a received copy adopted, node.moves) and `drop` (a copy
released or re-seeded), both on the store thread, which is also where the stores are used; roles
follow the placement view (`set_placement`), and a move's fence makes a copy FENCED (`fence`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from node.control.placement import Placement
from node.errors import NotOwnedError
from node.ids import parse_memory_id
from node.replica import ROLES, Replica, ReplicaState
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
        self.placement = placement  # this node's view (`set_placement`)
        # Added and dropped on the store thread only (`add`, `drop`), which reads them too.
        self.replicas: dict[int, Replica] = {s: Replica(s, self._role(s)) for s in held}
        self.gate = Gate()
        self._roles = threading.Lock()  # a copy added (store thread) takes the role of the view set meanwhile
        self.store_thread = store_thread
        self.open_store = open_store  # opens (or creates) a shard's folder here, held or not

    async def run(self, fn, *args, busy: str | None = None):
        """Run `fn(*args)` on the store thread, where every store is used."""
        return await self.store_thread.run(fn, *args, busy=busy)

    def root(self, shard: int) -> Path:
        return shard_dir(self.data_dir, shard)

    @property
    def held(self) -> set[int]:
        """The shards this node holds a copy of (primary, follower or fenced)."""
        return set(self.replicas)

    @property
    def stores(self) -> dict[int, ShardStore]:
        """The held copies opened so far, by shard."""
        return {s: r.store for s, r in list(self.replicas.items()) if r.store is not None}

    # ---- which copies, in which role --------------------------------------------------------------

    def _role(self, shard: int) -> ReplicaState:
        return ReplicaState.PRIMARY if self.placement.owner[shard] == self.name else ReplicaState.FOLLOWER

    def set_placement(self, placement: Placement) -> None:
        """Take a newer placement view: each held copy's role follows it (a fenced one stays fenced)."""
        with self._roles:
            self.placement = placement
            for shard, replica in self.replicas.items():
                if replica.state in ROLES:
                    replica.to(self._role(shard))

    def replica(self, shard: int) -> Replica:
        """The held copy of `shard`; NotOwnedError if there is none."""
        replica = self.replicas.get(shard)
        if replica is None:
            raise NotOwnedError(f"shard {shard} is not owned by {self.name}")
        return replica

    def check_held(self, shard: int) -> None:
        self.replica(shard)

    def store(self, shard: int) -> ShardStore:
        """The held copy of `shard`, opened (or created) on first use; NotOwnedError if not held."""
        replica = self.replica(shard)
        if replica.store is None:
            replica.store = self.open_store(shard)
        return replica.store

    def on_disk(self, shard: int) -> bool:
        """Whether the held copy of `shard` exists on disk (opening it if so)."""
        if (self.root(shard) / "store.sqlite3").exists():
            self.store(shard)
            return True
        return False

    def is_primary(self, shard: int) -> bool:
        """Whether this node holds `shard`'s primary copy, by its placement view (fenced or not)."""
        return shard in self.replicas and self.placement.owner[shard] == self.name

    def role(self, shard: int) -> str:
        return "primary" if self.is_primary(shard) else "follower"

    def primaries(self) -> set[int]:
        return {s for s in list(self.replicas) if self.is_primary(s)}

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
        return [s for s in shards if self.replicas[s].store is not None or self.on_disk(s)]

    def check_entity(self, entity_id: str, shard: int) -> None:
        """NotOwnedError when this view places `entity_id` on another shard: a split moved it, and the
        caller's placement (or this view) does not know it yet. Free of cost in a cluster never split."""
        p = self.placement
        if p.shards != p.created_shards and (found := p.shard_of(entity_id)) != shard:
            raise NotOwnedError(f"entity {entity_id!r} is on shard {found}, not {shard}, since a split (placement "
                                f"epoch {p.epoch} of {self.name}); read the placement again")

    def check_named(self, memory_id: str, shards: list[int] | None) -> None:
        """An id that names its entity, asked of one shard: that shard must hold the entity (a split)."""
        entity = parse_memory_id(memory_id).entity_prefix
        if entity is not None and shards is not None and len(shards) == 1:
            self.check_entity(entity, shards[0])

    def check_shard_count(self, shards: list[int]) -> None:
        """NotOwnedError when a router's list of shards comes from a placement with another shard
        count than this view (node.records.ShardList): one of them has not seen a split yet."""
        of = getattr(shards, "of", 0)
        if of and of != self.placement.shards:
            raise NotOwnedError(f"the caller's placement has {of} shards, {self.name}'s (epoch "
                                f"{self.placement.epoch}) {self.placement.shards}: a split; read the placement again")

    def check_writable(self, shards: Iterable[int]) -> set[int]:
        """NotOwnedError unless this node holds the primary copy of every shard and none is fenced
        by a move: a follower copy takes writes only from its primary (`check_follower`)."""
        shards = set(shards)
        for s in shards:
            if self.replica(s).state == ReplicaState.FOLLOWER:
                raise NotOwnedError(f"shard {s}: this node holds a follower copy; writes go to the primary")
        self.gate.check(shards)
        return shards

    def check_follower(self, shard: int, primary: str) -> None:
        """NotOwnedError unless the copy of `shard` here is a follower (of `primary`) by this view."""
        self.check_held(shard)
        if self.placement.owner[shard] == self.name:
            raise NotOwnedError(f"shard {shard}: {self.name} is its primary (placement epoch "
                                f"{self.placement.epoch}), not a follower of {primary}")

    # ---- fences and copies changing hands -----------------------------------------------------------

    async def fence(self, shard: int) -> None:
        """Refuse new writes to the copy of `shard` here (FENCED), then wait for those in flight."""
        self.replica(shard).to(ReplicaState.FENCED)
        await self.gate.fence(shard)

    def unfence(self, shard: int) -> None:
        """Writes to `shard` go on here (if it is still held: its role by the placement view)."""
        self.gate.unfence(shard)
        replica = self.replicas.get(shard)
        if replica is not None and replica.state == ReplicaState.FENCED:
            replica.to(self._role(shard))

    def fenced(self) -> set[int]:
        return set(self.gate.fenced)

    def add(self, replica: Replica) -> None:
        """Hold a received copy (adopted: RECEIVING -> its role), on the store thread."""
        with self._roles:
            replica.to(self._role(replica.shard))
            self.replicas[replica.shard] = replica

    def drop(self, shard: int) -> None:
        """Stop holding `shard` here and close its store (RELEASED; its folder is the caller's), on
        the store thread."""
        with self._roles:
            replica = self.replicas.pop(shard, None)
        if replica is not None:
            replica.close()
