"""Shard replicas (node/replication.py) on real Ray, SQLite, Chroma and the real model: three node
actors of their own; a write acknowledged by a primary is on every live follower and answers the
same queries there; a killed follower does not block writes, is caught up from the log when it
comes back, or re-seeded when the log no longer reaches its seq or it diverged (an ex-primary);
`min_live_replicas`; followers refuse writes; a follower copy added by a move."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest
import ray

from node.actor import NodeActor
from node.names import NAMESPACE, actor_name
from node.errors import NodeError, NotOwnedError, TooFewReplicas
from node.control.placement import Placement
from tests.test_shard_move import QUERIES, entities_on, item

A, B, C = "rp-a", "rp-b", "rp-c"
KEEP = 10  # each node keeps this many changes per shard: a follower down for longer is re-seeded
# shard -> copies, the primary first. A requires two live copies per write; B and C one.
START = Placement(4, (A, B, C), replicas=((A, B, C), (A, B), (B, C), (C, A)))
WAIT_S = 120  # bound on waiting for background work (catch-up, re-seed, trimming); never asserted on


class Trio:
    """Three node actors of their own (names, data folders, configs) in the test session's Ray."""

    def __init__(self, cluster, root) -> None:
        self.placement = START
        self.configs = {
            name: dataclasses.replace(cluster.config, data_dir=str(root / name), changelog_keep=KEEP, replication=3,
                                      min_live_replicas=2 if name == A else 1, replica_timeout_s=5.0)
            for name in (A, B, C)}
        self.actors: dict[str, object] = {}
        for name in (A, B, C):
            self.start(name, wait=False)
        ray.get([a.info.remote() for a in self.actors.values()], timeout=600)

    def start(self, name: str, wait: bool = True):
        """Create node `name`'s actor (again, after a kill: the same name and data folder)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                actor = NodeActor.options(name=actor_name(name), namespace=NAMESPACE, num_cpus=0,
                                          max_concurrency=1024).remote(name, self.configs[name], self.placement, 1)
                break
            except ValueError:  # the killed actor's name is not free yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.actors[name] = actor
        if wait:
            ray.get(actor.info.remote(), timeout=600)
        return actor

    def kill(self, name: str) -> None:
        ray.kill(self.actors.pop(name))

    async def push(self, placement: Placement) -> None:
        self.placement = placement
        await asyncio.gather(*(a.set_placement.remote(placement) for a in self.actors.values()))

    def primary(self, shard: int):
        return self.actors[self.placement.node_of_shard(shard)]

    async def write(self, entity: str, memory_id: str, text: str) -> None:
        shard = self.placement.shard_of(entity)
        await self.primary(shard).ingest.remote([item(self.placement, entity, memory_id, text)])

    async def follower_state(self, shard: int, follower: str) -> dict:
        status = await self.primary(shard).replication_status.remote()
        return status["shards"][shard]["followers"][follower]

    async def caught_up(self, shard: int, follower: str) -> dict:
        """The primary's view of `follower` once it is live with nothing to send (bounded wait)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            state = await self.follower_state(shard, follower)
            if (state["live"] and state["lag"] == 0) or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.2)

    async def all_caught_up(self) -> None:
        for s, copies in enumerate(self.placement.replicas):
            for f in copies[1:]:
                if f in self.actors:
                    assert (await self.caught_up(s, f))["live"], (s, f)

    async def answers(self, name: str, shard: int, entities: list[str]) -> list:
        out = []
        for e in entities:
            for q in QUERIES:
                hits = await self.actors[name].query.remote(q, e, shard, 5)
                out.append([(h["memory_id"], round(h["similarity"], 4)) for h in hits])
        return out

    async def memories(self, name: str, shard: int) -> list:
        hits = await self.actors[name].query.remote(None, None, [shard], 10_000)
        return sorted((h["memory_id"], h["textual_content"]) for h in hits)

    def close(self) -> None:
        for a in self.actors.values():
            try:
                ray.get(a.close.remote(), timeout=60)
            except Exception:
                pass
            ray.kill(a)


@pytest.fixture(scope="module")
def trio(cluster, tmp_path_factory):
    t = Trio(cluster, tmp_path_factory.mktemp("replicas"))
    yield t
    t.close()


async def counters(actor) -> dict:
    return {k: v for k, v in (await actor.replication_status.remote()).items()
            if k in ("writes_waited", "followers_marked_down", "reseeds")}


async def test_an_acknowledged_write_is_on_every_copy_and_answers_the_same(trio):
    await trio.all_caught_up()
    shard = 0
    entities = entities_on(trio.placement, shard, "everywhere", 2)
    ids = []
    for i, e in enumerate(entities):
        for k, text in enumerate(["I live in Lisbon", "My favourite food is ramen", "Our dog is called Rex"]):
            ids.append(f"{e}::s1::{k}")
            await trio.write(e, ids[-1], f"{text} ({i})")
    for name in (A, B, C):  # acknowledged: read on each copy directly, no waiting
        for mid in ids:
            found = await trio.actors[name].inspect.remote(mid, [shard], False, 0)
            assert found is not None and found["node"] == name, (name, mid)
    assert await trio.answers(B, shard, entities) == await trio.answers(A, shard, entities) == \
        await trio.answers(C, shard, entities)
    states = [await trio.actors[n].copy_state.remote(shard) for n in (A, B, C)]
    assert states[0] == states[1] == states[2] and states[0][0] >= len(ids)

    # A delete and an erase reach the followers too.
    await trio.primary(shard).delete.remote(ids[0], [shard])
    await trio.primary(shard).erase.remote(entities[1], [shard])
    for name in (B, C):
        assert await trio.actors[name].inspect.remote(ids[0], [shard], False, 0) is None
        assert await trio.actors[name].query.remote("where does the user live", entities[1], shard, 5) == []
    assert await trio.memories(B, shard) == await trio.memories(A, shard) == await trio.memories(C, shard)

    # Followers refuse writes; the primary's status shows them live and up to date.
    b = trio.actors[B]
    for call in (b.ingest.remote([item(trio.placement, entities[0], f"{entities[0]}::s9::0", "refused")]),
                 b.delete.remote(ids[1], [shard]), b.erase.remote(entities[0], [shard]),
                 b.delete_ids.remote([(ids[1], shard)])):
        with pytest.raises(NotOwnedError, match="follower copy"):
            await call
    status = await trio.actors[A].replication_status.remote()
    assert status["shards"][shard]["role"] == "primary"
    assert {f: (s["live"], s["lag"]) for f, s in status["shards"][shard]["followers"].items()} == \
        {B: (True, 0), C: (True, 0)}
    assert status["writes_waited"] >= len(ids)
    assert (await b.replication_status.remote())["shards"][shard] == {"role": "follower",
                                                                       "seq": status["shards"][shard]["seq"]}
    stats = await b.stats.remote()
    assert stats["per_shard"][shard]["role"] == "follower"
    assert "replication" in stats and await b.ping.remote() == {"node": B, "epoch": trio.placement.epoch}


async def test_a_killed_follower_does_not_block_writes_and_catches_up_from_the_log(trio):
    await trio.all_caught_up()
    a = trio.actors[A]
    three, two = 0, 1  # copies on A, B, C and on A, B; A wants two live copies per write
    e3 = entities_on(trio.placement, three, "killed3", 1)[0]
    e2 = entities_on(trio.placement, two, "killed2", 1)[0]
    await trio.write(e3, f"{e3}::s1::0", "before the crash, three copies")
    await trio.write(e2, f"{e2}::s1::0", "before the crash, two copies")
    before = await counters(a)
    trio.kill(B)

    # Shard 0 keeps two live copies (A, C): writes are acknowledged without B.
    written = []
    for k in range(1, 4):
        written.append(f"{e3}::s1::{k}")
        await trio.write(e3, written[-1], f"while B is down, note {k}")
    assert not (await trio.follower_state(three, B))["live"]
    assert (await trio.follower_state(three, C))["live"]
    # Shard 1 has one live copy left: the write is stored on A but not acknowledged.
    with pytest.raises(TooFewReplicas):
        await trio.write(e2, f"{e2}::s1::1", "while B is down, two copies wanted")
    assert (await a.inspect.remote(f"{e2}::s1::1", [two], False, 0)) is not None
    after = await counters(a)
    assert after["followers_marked_down"] >= before["followers_marked_down"] + 2

    trio.start(B)  # a new actor, the same name and data folder: caught up from A's log
    for s in (three, two):
        state = await trio.caught_up(s, B)
        assert state["live"] and state["lag"] == 0, state
    assert (await counters(a))["reseeds"] == before["reseeds"]
    b = trio.actors[B]
    for mid, s in [(m, three) for m in written] + [(f"{e2}::s1::1", two)]:
        assert (await b.inspect.remote(mid, [s], False, 0)) is not None, mid
    assert await trio.memories(B, three) == await trio.memories(A, three)
    assert await trio.memories(B, two) == await trio.memories(A, two)
    await trio.write(e2, f"{e2}::s1::2", "B is back: acknowledged again")
    assert (await b.inspect.remote(f"{e2}::s1::2", [two], False, 0)) is not None


async def test_a_follower_that_stops_answering_is_marked_down_after_the_timeout(trio):
    await trio.all_caught_up()
    a, shard = trio.actors[A], 0  # A, B, C: A wants two live copies, so B may be down
    entity = entities_on(trio.placement, shard, "stalled", 1)[0]
    await trio.write(entity, f"{entity}::s1::0", "before B stalls")
    pid = (await trio.actors[B].info.remote())["pid"]
    before = await counters(a)
    os.kill(pid, signal.SIGSTOP)
    try:
        # Acknowledged once replica_timeout_s marks B down; the next one does not wait for B.
        await trio.write(entity, f"{entity}::s1::1", "B does not answer")
        assert not (await trio.follower_state(shard, B))["live"]
        assert "Timeout" in (await trio.follower_state(shard, B))["error"]
        await trio.write(entity, f"{entity}::s1::2", "B is still stalled")
        assert (await counters(a))["followers_marked_down"] == before["followers_marked_down"] + 1
    finally:
        os.kill(pid, signal.SIGCONT)
    state = await trio.caught_up(shard, B)  # it answers again: caught up from the log
    assert state["live"] and state["lag"] == 0, state
    assert await trio.memories(B, shard) == await trio.memories(A, shard)


async def test_a_follower_behind_the_trimmed_log_is_reseeded(trio):
    await trio.all_caught_up()
    a, shard = trio.actors[A], 0
    entity = entities_on(trio.placement, shard, "trimmed", 1)[0]
    await trio.write(entity, f"{entity}::s1::0", "before C went away")
    seq_c = (await trio.actors[C].copy_state.remote(shard))[0]
    before = await counters(a)
    trio.kill(C)
    for k in range(1, 3 * KEEP):
        await trio.write(entity, f"{entity}::s1::{k}", f"note {k} written while C is away")

    async def trimmed_past(after: int) -> bool:
        try:
            await a.changes_since.remote(shard, after, 1)
            return False
        except NodeError:
            return True

    deadline = time.monotonic() + WAIT_S  # A trims its log after a pause in writes
    while not await trimmed_past(seq_c) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await trimmed_past(seq_c)

    trio.start(C)
    state = await trio.caught_up(shard, C)
    assert state["live"] and state["lag"] == 0, state
    assert (await counters(a))["reseeds"] == before["reseeds"] + 1
    assert await trio.memories(C, shard) == await trio.memories(A, shard)
    assert await trio.answers(C, shard, [entity]) == await trio.answers(A, shard, [entity])
    assert await trio.actors[C].copy_state.remote(shard) == await a.copy_state.remote(shard)
    await trio.write(entity, f"{entity}::s2::0", "after the re-seed")
    assert (await trio.actors[C].inspect.remote(f"{entity}::s2::0", [shard], False, 0)) is not None


async def test_a_diverged_ex_primary_is_reseeded_and_ends_identical(trio):
    await trio.all_caught_up()
    shard = 2  # B primary, C follower
    entities = entities_on(trio.placement, shard, "diverged", 2)
    await trio.write(entities[0], f"{entities[0]}::s1::0", "I live in Oslo")
    await trio.write(entities[1], f"{entities[1]}::s1::0", "My favourite food is pho")
    trio.kill(C)
    # B commits writes C never gets (C is down), then B fails too.
    await trio.write(entities[0], f"{entities[0]}::s1::1", "only the old primary has this: I moved to Lima")
    lost_seq = (await trio.actors[B].copy_state.remote(shard))[0]
    trio.kill(B)

    # C is promoted; it comes back and takes writes of its own, at the same seq numbers.
    await trio.push(trio.placement.with_primary(shard, C))
    assert trio.placement.replicas[shard] == (C, B)
    c = trio.start(C)
    before = await counters(c)
    await trio.write(entities[0], f"{entities[0]}::s2::0", "the new primary says: I moved to Quito")
    await trio.write(entities[1], f"{entities[1]}::s2::0", "the new primary says: tacos now")
    assert (await c.copy_state.remote(shard))[0] >= lost_seq

    b = trio.start(B)  # the old primary, now a follower with a copy that diverged
    assert (await b.get_placement.remote()).node_of_shard(shard) == C
    state = await trio.caught_up(shard, B)
    assert state["live"] and state["lag"] == 0, state
    assert (await counters(c))["reseeds"] == before["reseeds"] + 1
    assert await b.inspect.remote(f"{entities[0]}::s1::1", [shard], False, 0) is None  # the lost write is gone
    assert await trio.memories(B, shard) == await trio.memories(C, shard)
    assert await trio.answers(B, shard, entities) == await trio.answers(C, shard, entities)
    assert await b.copy_state.remote(shard) == await c.copy_state.remote(shard)
    with pytest.raises(NotOwnedError, match="follower copy"):
        await b.ingest.remote([item(trio.placement, entities[0], f"{entities[0]}::s3::0", "refused")])
    await trio.write(entities[0], f"{entities[0]}::s3::0", "written on C, on B at once")
    assert await b.inspect.remote(f"{entities[0]}::s3::0", [shard], False, 0) is not None


async def test_a_follower_copy_added_by_a_move_gets_every_write(trio):
    await trio.all_caught_up()
    shard = 1  # A primary, B follower: add a copy on C
    a, b, c = (trio.actors[n] for n in (A, B, C))
    entity = entities_on(trio.placement, shard, "added", 1)[0]
    await trio.write(entity, f"{entity}::s1::0", "before the copy")
    await c.receive_shard.remote(shard, A)
    await c.catch_up.remote(shard, A)
    await c.adopt.remote(shard)
    await a.unfence.remote(shard)  # releases the move's log pin (receive_shard took it)
    # Written after C's catch-up, before the placement names C: A does not send it to C yet.
    await trio.write(entity, f"{entity}::s1::1", "between the catch-up and the placement")
    await trio.push(trio.placement.with_copy_added(shard, C))
    await trio.write(entity, f"{entity}::s1::2", "after the placement")
    for k in range(3):
        assert await c.inspect.remote(f"{entity}::s1::{k}", [shard], False, 0) is not None, k
    assert await trio.memories(C, shard) == await trio.memories(A, shard)
    # A copy the placement lists is never released or dropped; one it no longer lists is.
    with pytest.raises(NodeError, match="will not release"):
        await b.release.remote(shard)
    with pytest.raises(NodeError, match="will not drop"):
        await c.abort_incoming.remote(shard)
    await trio.push(trio.placement.with_copy_dropped(shard, B))
    await b.release.remote(shard)
    with pytest.raises(NotOwnedError):
        await b.query.remote("before the copy", entity, shard, 5)
    await trio.write(entity, f"{entity}::s1::3", "two copies again: A and C")
    assert await c.inspect.remote(f"{entity}::s1::3", [shard], False, 0) is not None
    assert set((await a.replication_status.remote())["shards"][shard]["followers"]) == {C}


async def test_an_erased_entitys_free_form_id_records_go_from_every_copy(trio):
    await trio.all_caught_up()
    home = 0  # the id's home shard: A primary, B and C followers
    entity = entities_on(trio.placement, home, "free-erased", 1)[0]
    mid = next(m for m in (f"free-secret-{i}" for i in range(10_000)) if trio.placement.id_home(m) == home)
    since = (await trio.actors[A].copy_state.remote(home))[0]  # the logs keep the changes after it (< KEEP)
    await trio.actors[A].ingest_free.remote([item(trio.placement, entity, mid, "a note with a free-form id")])
    assert await trio.actors[B].inspect.remote(mid, [home], False, 0) is not None

    def about(changes: list) -> list:
        return [c for c in changes if c.key == mid and c.op in ("home", "unhome")]

    assert about(await trio.actors[B].changes_since.remote(home, since, 10_000))
    await trio.actors[A].erase.remote(entity, [home])
    for name in (A, B, C):  # no copy keeps a record of where the erased id lived
        assert not about(await trio.actors[name].changes_since.remote(home, since, 10_000)), name
        assert await trio.actors[name].inspect.remote(mid, [home], False, 0) is None
    assert await trio.actors[B].copy_state.remote(home) == await trio.actors[A].copy_state.remote(home)


async def test_a_primary_handed_over_under_writes_keeps_every_acknowledged_write(trio, tmp_path):
    """The authority's handover (MoveDriver._hand_over): the primary role of a shard goes to its
    follower while a writer retries as a router does; every acknowledged write is on both copies,
    the new primary takes writes and the old one, a follower now, refuses them."""
    from node.control.authority import PlacementAuthority

    await trio.all_caught_up()
    shard = 1
    old, new = trio.placement.replicas[shard][:2]
    authority = PlacementAuthority(str(tmp_path), trio.placement.shards, list(trio.placement.nodes))
    authority._set(dataclasses.replace(trio.placement, epoch=trio.placement.epoch + 1, owner=()))
    authority.joined = {name: {} for name in trio.actors}
    entity = entities_on(trio.placement, shard, "handed", 1)[0]
    acknowledged: list[str] = []
    done = asyncio.Event()

    async def writer() -> None:
        k = 0
        while not done.is_set():
            mid = f"{entity}::s1::{k}"
            try:
                await trio.write(entity, mid, f"written while the primary is handed over {k}")
                acknowledged.append(mid)
                k += 1
            except (NotOwnedError, NodeError):  # fenced, or no longer the primary: the router's retry
                trio.placement = authority._placement
                await asyncio.sleep(0.01)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.5)
    await authority._hand_over(shard, old, new)
    trio.placement = authority._placement
    await asyncio.sleep(0.5)
    done.set()
    await task
    assert authority._placement.replicas[shard][:2] == (new, old) and authority.history[-1]["state"] == "done"
    assert len(acknowledged) > 2
    await trio.all_caught_up()
    for name in (old, new):
        held = {m for m, _ in await trio.memories(name, shard)}
        assert set(acknowledged) <= held, (name, set(acknowledged) - held)
    with pytest.raises(NotOwnedError):
        await trio.actors[old].ingest.remote([item(trio.placement, entity, f"{entity}::s1::x", "to the old one")])
