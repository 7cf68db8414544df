"""A node's side of free-form ids: it is the home of the ids hashed to its shards (node.id_homes).

`FreeIds` serialises every write and delete of such an id (one lock per id), records where it
lives, and moves it between shards in one operation, calling the nodes that hold the shards: this
node directly, another one through its Ray actor. Those are found by this node's view of the
placement; a node that answers NotOwnedError (the view is stale, or the shard is fenced for a move)
is asked again after a short backoff, with the view refreshed from the placement authority if one
runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from node import id_homes
from node.errors import NotOwnedError
from node.ids import parse_memory_id
from node.names import Handles, authority
from node.records import IngestItem
from node.shard_set import ShardSet
from node.store import ShardStore
from node.tuning import FREE_ID_RETRIES, FREE_ID_BACKOFF_S

log = logging.getLogger("tellodb.node")



class FreeIds:
    def __init__(self, shards: ShardSet, handles: Handles, local: Any) -> None:
        self.shards = shards
        self.handles = handles
        self.local = local  # this node's `Node`: its own methods are called directly, not through Ray
        self._locks: dict[str, asyncio.Lock] = {}  # free-form ids being written or deleted

    @property
    def placement(self):
        return self.shards.placement  # this node's current view (Node.set_placement)

    # ---- other nodes ---------------------------------------------------------------------------

    async def call(self, node: str, method: str, *args: Any) -> Any:
        """Call a `Node` method on `node`, which may be this one."""
        if node == self.shards.name:
            return await getattr(self.local, method)(*args)
        return await getattr(self.handles.get(node), method).remote(*args)

    async def call_shard(self, shard: int, method: str, *args: Any) -> Any:
        """Call a `Node` method on the node of `shard`; if it does not own the shard (any more, or
        not yet, or it is fenced for a move), look again after a short backoff."""
        for attempt in range(FREE_ID_RETRIES):
            try:
                return await self.call(self._node_of(shard), method, *args)
            except NotOwnedError:
                if attempt == FREE_ID_RETRIES - 1:
                    raise
                await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> None:
        """Wait before a retry, then refresh the placement from the authority if it runs."""
        await asyncio.sleep(FREE_ID_BACKOFF_S * 2**attempt)
        found = authority()
        if found is None:  # no authority: the retry alone may find the move done
            return
        try:
            await self.local.set_placement(await found.placement.remote())
        except Exception as exc:  # it may be restarting: the retry goes on with the view we have
            log.warning("%s: refreshing the placement failed: %r", self.shards.name, exc)

    def _node_of(self, shard: int) -> str:
        return self.placement.node_of_shard(shard)

    # ---- locks and records ------------------------------------------------------------------------

    async def _locked(self, ids: list[str]) -> list[asyncio.Lock]:
        """Hold the locks of `ids` (sorted, so two writers of overlapping ids never deadlock)."""
        locks = [self._locks.setdefault(m, asyncio.Lock()) for m in sorted(set(ids))]
        for lock in locks:
            await lock.acquire()
        return locks

    def _unlock(self, ids: list[str], locks: list[asyncio.Lock]) -> None:
        for lock in locks:
            lock.release()
        for m in set(ids):
            lock = self._locks.get(m)
            if lock is not None and not lock.locked() and not lock._waiters:
                del self._locks[m]

    def _home_store(self, memory_id: str) -> ShardStore:
        return self.shards.store(self.placement.id_home(memory_id))

    async def _on_store(self, fn, *args):
        return await self.shards.run(fn, *args)

    async def _homes(self, ids: list[str]) -> dict[str, id_homes.Home]:
        def read() -> dict[str, id_homes.Home]:
            found: dict[str, id_homes.Home] = {}
            for m in ids:
                found.update(id_homes.lookup(self._home_store(m), [m]))
            return found

        return await self._on_store(read)

    async def _record_homes(self, homes: dict[str, id_homes.Home | None]) -> None:
        def write() -> None:
            for m, home in homes.items():
                if home is None:
                    id_homes.forget(self._home_store(m), [m])
                else:
                    id_homes.record(self._home_store(m), {m: home})

        await self._on_store(write)

    # A home record names the shard the memory was written to; a split since may have moved it to a
    # shard split from that one (`Placement.family`), so the memory is looked for there too.

    async def _holds(self, memory_id: str, shard: int) -> int | None:
        """The shard of `shard`'s family that holds the memory, or None."""
        for s in self.placement.family(shard):
            if await self.call_shard(s, "inspect", memory_id, [s], False, 0) is not None:
                return s
        return None

    async def _delete_at(self, memory_id: str, shard: int, keep: int | None = None) -> bool:
        """Delete the memory from `shard` and its family, but from `keep` (where its new copy is)."""
        return any([await self.call_shard(s, "delete", memory_id, [s])
                    for s in self.placement.family(shard) if s != keep])

    async def _settle(self, memory_id: str, home: id_homes.Home) -> id_homes.Home:
        """Finish a move a crash interrupted: keep the new copy if it was written, else the old."""
        if home.moving_from is None:
            return home
        held = await self._holds(memory_id, home.shard)
        if held is not None:
            await self._delete_at(memory_id, home.moving_from, keep=held)
            settled = id_homes.Home(home.shard, None)
        else:
            settled = id_homes.Home(home.moving_from, None)
        await self._record_homes({memory_id: settled})
        return settled

    # ---- the operations (node.service.Node's API delegates here) --------------------------------

    async def ingest(self, items: list[IngestItem], deadline: float | None = None) -> list[str | None]:
        ids = [it.memory_id for it in items]
        last = {it.memory_id: it for it in items}  # within one request the last write of an id wins
        locks = await self._locked(ids)
        try:
            homes = {m: await self._settle(m, h) for m, h in (await self._homes(list(last))).items()}
            intents = {m: id_homes.Home(it.shard, homes[m].shard if m in homes and homes[m].shard != it.shard
                                        else None) for m, it in last.items()}
            await self._record_homes(intents)
            try:
                answer = await self._write_items(list(last.values()), deadline)
            except BaseException:
                # Nothing of a failed write is stored (a node's write is all-or-nothing): back to before.
                await self._record_homes({m: homes.get(m) for m in last})
                raise
            final: dict[str, id_homes.Home | None] = {}
            for m, intent in intents.items():
                if answer[m] is not None:  # a near-duplicate: not stored, the id stays where it was
                    final[m] = homes.get(m)
                    continue
                if intent.moving_from is not None:
                    await self._delete_at(m, intent.moving_from, keep=intent.shard)
                final[m] = id_homes.Home(intent.shard, None)
            await self._record_homes(final)
            return [answer[m] for m in ids]
        finally:
            self._unlock(ids, locks)

    async def _write_items(self, items: list[IngestItem], deadline: float | None) -> dict[str, str | None]:
        """Ingest `items` at their shards' nodes, one call per node; the items of a node that
        answers NotOwnedError are sent again (to wherever the refreshed placement says) after a
        backoff. Per memory id, its dedup answer."""
        answer: dict[str, str | None] = {}
        for attempt in range(FREE_ID_RETRIES):
            groups: dict[str, list[IngestItem]] = {}
            for it in items:
                groups.setdefault(self._node_of(it.shard), []).append(it)
            parts = await asyncio.gather(
                *(self.call(node, "ingest", group, deadline) for node, group in groups.items()), return_exceptions=True)
            items = []
            for group, part in zip(groups.values(), parts):
                if isinstance(part, NotOwnedError) and attempt < FREE_ID_RETRIES - 1:
                    items += group
                elif isinstance(part, BaseException):
                    raise part
                else:
                    answer.update((it.memory_id, dup) for it, dup in zip(group, part))
            if not items:
                return answer
            await self._backoff(attempt)
        raise AssertionError("unreachable")

    async def inspect(self, memory_id: str, include_window: bool, radius: int) -> dict | None:
        home = (await self._homes([memory_id])).get(memory_id)
        if home is None:
            return None
        for shard in (home.shard, home.moving_from):
            for s in self.placement.family(shard) if shard is not None else ():
                found = await self.call_shard(s, "inspect", memory_id, [s], include_window, radius)
                if found is not None:
                    return found
        return None

    async def delete(self, memory_id: str) -> bool:
        locks = await self._locked([memory_id])
        try:
            home = (await self._homes([memory_id])).get(memory_id)
            if home is None:
                return False
            deleted = [await self._delete_at(memory_id, s) for s in (home.shard, home.moving_from) if s is not None]
            await self._record_homes({memory_id: None})
            return any(deleted)
        finally:
            self._unlock([memory_id], locks)

    async def forget_erased(self, ids: list[str]) -> None:
        """An erased entity's free-form ids: their home records name its shard, so no trace may stay
        behind; each home node drops its records (`Node.forget_homes`)."""
        by_home: dict[int, list[str]] = {}
        for m in ids:
            by_home.setdefault(self.placement.id_home(m), []).append(m)
        await asyncio.gather(*(self.call_shard(home, "forget_homes", part) for home, part in by_home.items()))

    async def forget(self, ids: list[str]) -> None:
        """Drop the home records of an erased entity's free-form ids here, and their log entries."""
        await self._on_store(lambda: [id_homes.forget(self._home_store(m), [m], erased=True) for m in ids])

    async def unregistered(self) -> dict[int, list[str]]:
        """Per shard here that predates id homes: its free-form ids (to register at their homes)."""
        shards = self.shards

        def collect() -> dict[int, list[str]]:
            found: dict[int, list[str]] = {}
            for s in sorted(shards.primaries()):
                if not shards.readable([s]) or shards.stores[s].meta("id_homes") is not None:
                    continue
                found[s] = [m for (m,) in shards.stores[s].db.execute("SELECT memory_id FROM memories")
                            if parse_memory_id(m).entity_prefix is None]
            return found

        return await self._on_store(collect)

    async def register(self, pairs: list[tuple[str, int]]) -> None:
        """Record the shard of free-form ids found in old shards, unless the id already has a home."""

        def write() -> None:
            for m, shard in pairs:
                store = self._home_store(m)
                if not id_homes.lookup(store, [m]):
                    id_homes.record(store, {m: id_homes.Home(shard, None)})

        await self._on_store(write)

    async def mark_registered(self, shards: list[int]) -> None:
        await self._on_store(lambda: [self.shards.store(s).set_meta("id_homes", "1") for s in shards])
