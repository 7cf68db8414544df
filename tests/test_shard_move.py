"""Moving a shard between two node actors while it is written (node/moves.py), on real Ray, SQLite,
Chroma and the real model: the steps the placement authority runs (receive, fence, catch up,
adopt, flip the placement, release), their rollback, the source's log pin, and free-form ids whose
home shard moves."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

import pytest
import ray

from node.actor import NodeActor
from node.names import NAMESPACE, actor_name
from node.errors import NodeError, NotOwnedError
from node.ids import parse_memory_id
from node.records import IngestItem
from node.control.placement import Placement
from node.shard_set import shard_dir

A, B = "mv-a", "mv-b"
QUERIES = ["where does the user live", "favourite food", "the dog's name", "weekend plans"]
FACTS = ["I live in {city}", "My favourite food is {food}", "Our dog is called {dog}",
         "This weekend I will visit {city} with {dog}", "I work at {city} Labs"]
CITIES, FOODS, DOGS = ["Lisbon", "Oslo", "Lima", "Quito"], ["ramen", "tacos", "pho"], ["Rex", "Bo", "Kiki"]
KEEP = 5  # the nodes keep only this many changes per shard (beyond pins), so pins matter here
_serial = itertools.count()
START = Placement(8, (A, B), owner=(A, B, A, B, B, A, B, B))  # B holds five: its tests take one each
A_SHARDS, B_SHARDS = START.shards_of(A), START.shards_of(B)  # each test moves shards of its own


def item(placement: Placement, entity: str, memory_id: str, text: str, **extra) -> IngestItem:
    parsed = parse_memory_id(memory_id)
    return IngestItem(memory_id=memory_id, entity_id=entity, session_id=parsed.session_id,
                      turn_index=parsed.turn_index, created_at_ms=1_700_000_000_000 + next(_serial),
                      textual_content=text, shard=placement.shard_of(entity), **extra)


def entities_on(placement: Placement, shard: int, prefix: str, n: int) -> list[str]:
    return [e for e in (f"{prefix}{i}" for i in range(10_000)) if placement.shard_of(e) == shard][:n]


class Pair:
    """Two node actors of their own (data folders, names, placement) in the test session's Ray."""

    def __init__(self, cluster, root) -> None:
        self.placement = START
        self.dirs = {A: root / "a", B: root / "b"}
        self.actors = {}
        for name in (A, B):
            config = dataclasses.replace(cluster.config, data_dir=str(self.dirs[name]), changelog_keep=KEEP)
            self.actors[name] = NodeActor.options(
                name=actor_name(name), namespace=NAMESPACE, num_cpus=0, max_concurrency=1024,
            ).remote(name, config, self.placement, 1)
        ray.get([a.info.remote() for a in self.actors.values()], timeout=600)

    def node(self, shard: int):
        return self.actors[self.placement.node_of_shard(shard)]

    async def write(self, entity: str, memory_id: str, text: str) -> None:
        await self.node(self.placement.shard_of(entity)).ingest.remote([item(self.placement, entity, memory_id, text)])

    async def seed(self, entities: list[str], tag: str) -> list[str]:
        items = [item(self.placement, e, f"{e}::{tag}::{k}",
                      f.format(city=CITIES[(i + k) % 4], food=FOODS[i % 3], dog=DOGS[(i + k) % 3]),
                      relations=(((e, "lives_in", CITIES[i % 4]),) if k == 0 else ()))
                 for i, e in enumerate(entities) for k, f in enumerate(FACTS)]
        shard = items[0].shard
        await self.node(shard).ingest.remote(items)
        return [it.memory_id for it in items]

    async def answers(self, actor, shard: int, entities: list[str]) -> list:
        out = []
        for e in entities:
            for q in QUERIES:
                hits = await actor.query.remote(q, e, shard, 5)
                out.append([(h["memory_id"], round(h["similarity"], 5)) for h in hits])
        return out

    async def flip(self, shard: int, to: str) -> None:
        self.placement = self.placement.with_owner(shard, to)
        await asyncio.gather(*(a.set_placement.remote(self.placement) for a in self.actors.values()))

    async def move(self, shard: int, during_fence=None, adopted=None) -> dict:
        """The authority's sequence for one shard, from its owner to the other node."""
        src = self.placement.node_of_shard(shard)
        dst = B if src == A else A
        source, target = self.actors[src], self.actors[dst]
        info = await target.receive_shard.remote(shard, src)
        seq = await source.fence.remote(shard)
        if during_fence is not None:
            await during_fence(source, target)
        reached = await target.catch_up.remote(shard, src)
        assert reached == seq
        await target.adopt.remote(shard)
        if adopted is not None:
            await adopted(target)
        await self.flip(shard, dst)
        await source.release.remote(shard)
        return info

    async def shard_stats(self, name: str, shard: int) -> dict:
        return (await self.actors[name].stats.remote())["per_shard"][shard]

    async def indexed(self, name: str, shard: int) -> dict:
        """The shard's stats once its indexer has caught up (it indexes after a pause in writes)."""
        deadline = time.monotonic() + 60
        while (stats := await self.shard_stats(name, shard))["unindexed"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return stats

    def close(self) -> None:
        ray.get([a.close.remote() for a in self.actors.values()], timeout=60)
        for a in self.actors.values():
            ray.kill(a)


@pytest.fixture(scope="module")
def pair(cluster, tmp_path_factory):
    p = Pair(cluster, tmp_path_factory.mktemp("moves"))
    yield p
    p.close()


async def test_a_shard_moves_while_it_is_written(pair):
    shard = A_SHARDS[0]
    seeded_entities = entities_on(pair.placement, shard, "move-user", 3)
    seeded = await pair.seed(seeded_entities, "s1")
    before = await pair.answers(pair.actors[A], shard, seeded_entities)
    edges_before = await pair.actors[A].edges.remote(seeded_entities[0], shard, [seeded_entities[0]], "out", None, 10)
    writer_entity = entities_on(pair.placement, shard, "move-writer", 1)[0]
    acked: list[str] = []
    refused = 0
    stop = asyncio.Event()

    async def writer() -> None:
        """A client that writes to the shard's owner as it knows it, and retries NotOwnedError."""
        nonlocal refused
        for k in itertools.count():
            if stop.is_set():
                return
            mid = f"{writer_entity}::w::{k}"
            while True:
                try:
                    await pair.write(writer_entity, mid, f"note {k}: the weather in {CITIES[k % 4]} today")
                    break
                except NotOwnedError:
                    refused += 1
                    await asyncio.sleep(0.01)
            acked.append(mid)

    frozen = {}

    async def during_fence(source, target) -> None:
        # The copy on A is final now: it still answers, and refuses writes until released.
        frozen["answers"] = await pair.answers(source, shard, seeded_entities)
        frozen["edges"] = await source.edges.remote(seeded_entities[0], shard, [seeded_entities[0]], "out", None, 10)
        # The same memories answer; their order may not hold: the writer's notes, in the same shard,
        # change its BM25 statistics (idf, average length), so near scores can swap.
        assert [sorted(m for m, _ in hits) for hits in frozen["answers"]][::len(QUERIES)] == \
            [sorted(m for m, _ in hits) for hits in before][::len(QUERIES)]
        with pytest.raises(NotOwnedError, match="moving"):
            await source.ingest.remote([item(pair.placement, writer_entity, f"{writer_entity}::x::0", "refused")])
        assert (await source.stats.remote())["moves"] == {shard: "fenced"}
        assert (await target.stats.remote())["moves"] == {shard: "received"}

    async def adopted(target) -> None:
        # B serves its copy before the placement sends it writes: the same answers as A's final copy.
        assert await pair.answers(target, shard, seeded_entities) == frozen["answers"]
        assert await target.edges.remote(seeded_entities[0], shard, [seeded_entities[0]], "out", None, 10) == \
            frozen["edges"] == edges_before

    task = asyncio.create_task(writer())
    while len(acked) < 10:
        await asyncio.sleep(0.05)
    info = await pair.move(shard, during_fence, adopted)
    moved_at = len(acked)
    while len(acked) < moved_at + 10:  # the writer goes on at the new owner
        assert not task.done(), task.exception()
        await asyncio.sleep(0.05)
    stop.set()
    await task

    assert pair.placement.node_of_shard(shard) == B
    assert set(info) == {"shard", "seq", "bytes", "memories", "seconds", "copy_seconds", "index_seconds"}
    assert info["shard"] == shard and info["bytes"] > 0 and info["memories"] >= len(seeded) + 10
    assert refused > 0  # the writer met the fence (or the stale placement) and retried
    for mid in seeded + acked:  # every acknowledged write is on B
        found = await pair.actors[B].inspect.remote(mid, [shard], False, 0)
        assert found is not None and found["node"] == B, mid
    stats = await pair.indexed(B, shard)
    assert stats["memories"] == len(seeded) + len(acked) == stats["vectors"]
    assert stats["seq"] > 0 and stats["bytes"] > 0
    assert not shard_dir(pair.dirs[A], shard).exists() and shard_dir(pair.dirs[B], shard).exists()
    assert (await pair.actors[A].stats.remote())["moves"] == {} == (await pair.actors[B].stats.remote())["moves"]

    # A no longer answers for the shard: a request naming it is refused, never answered empty.
    a = pair.actors[A]
    for call in (a.query.remote("where does the user live", seeded_entities[0], shard, 5),
                 a.query.remote("where does the user live", None, [shard], 5),
                 a.edges.remote(seeded_entities[0], shard, [seeded_entities[0]], "out", None, 10),
                 a.inspect.remote(seeded[0], [shard], False, 0),
                 a.ingest.remote([item(pair.placement, writer_entity, f"{writer_entity}::x::1", "too late")]),
                 a.delete.remote(seeded[0], [shard]),
                 a.erase.remote(seeded_entities[0], [shard]),
                 a.changes_since.remote(shard, 0, 10)):
        with pytest.raises(NotOwnedError):
            await call
    # A fan-out over every shard here leaves the moved shard out instead of counting it twice.
    everywhere = await a.query.remote("where does the user live", None, None, 1000)
    assert not any(h["memory_id"] in seeded for h in everywhere)


async def test_a_shard_moves_away_and_back_with_the_same_answers(pair):
    shard = A_SHARDS[1]
    entities = entities_on(pair.placement, shard, "round-trip", 2)
    await pair.seed(entities, "s1")
    before = await pair.answers(pair.actors[A], shard, entities)
    await pair.move(shard)  # A -> B
    assert await pair.answers(pair.actors[B], shard, entities) == before
    await pair.write(entities[0], f"{entities[0]}::s2::0", "I moved to Quito last month")
    on_b = await pair.answers(pair.actors[B], shard, entities)
    await pair.move(shard)  # B -> A: A opens the same folder path again
    assert pair.placement.node_of_shard(shard) == A
    hits = await pair.actors[A].query.remote("where does the user live", entities[0], shard, 1)
    assert hits[0]["memory_id"] == f"{entities[0]}::s2::0"  # the write made on B came back
    assert await pair.answers(pair.actors[A], shard, entities) == on_b != before
    stats = await pair.indexed(A, shard)
    assert stats["memories"] == 2 * len(FACTS) + 1 == stats["vectors"]
    assert not shard_dir(pair.dirs[B], shard).exists()


async def test_a_rolled_back_move_leaves_the_source_serving_and_no_copy(pair):
    shard = A_SHARDS[2]
    entity = entities_on(pair.placement, shard, "rollback", 1)[0]
    await pair.seed([entity], "s1")
    a, b = pair.actors[A], pair.actors[B]
    await b.receive_shard.remote(shard, A)
    again = await b.receive_shard.remote(shard, A)  # an earlier attempt's copy is replaced
    assert again["memories"] == len(FACTS)
    await a.fence.remote(shard)
    with pytest.raises(NotOwnedError):
        await pair.write(entity, f"{entity}::s2::0", "refused while fenced")
    with pytest.raises(NotOwnedError):  # B does not serve its copy before adopting it
        await b.query.remote("where does the user live", entity, shard, 5)

    for _ in range(2):  # the rollback is idempotent
        await b.abort_incoming.remote(shard)
        await a.unfence.remote(shard)
    assert not shard_dir(pair.dirs[B], shard).exists()
    assert not list((pair.dirs[B] / "shards").glob("*.incoming"))
    assert (await b.stats.remote())["moves"] == {} == (await a.stats.remote())["moves"]
    with pytest.raises(NodeError, match="no copy"):
        await b.adopt.remote(shard)
    await pair.write(entity, f"{entity}::s2::0", "accepted after the rollback")
    assert (await a.inspect.remote(f"{entity}::s2::0", [shard], False, 0))["node"] == A
    # Nothing to roll back is fine too; a shard the node owns by its placement is never dropped.
    await b.abort_incoming.remote(shard)
    await a.unfence.remote(shard)
    with pytest.raises(NodeError, match="will not drop"):
        await a.abort_incoming.remote(shard)
    with pytest.raises(NodeError, match="will not release"):
        await a.release.remote(shard)


async def test_the_move_pin_keeps_the_log_and_a_trimmed_log_is_refused(pair):
    shard = B_SHARDS[1]
    entity = entities_on(pair.placement, shard, "pinned", 1)[0]
    a = pair.actors[B]  # the source of a move that will be rolled back
    await pair.seed([entity], "s1")
    snap = await a.snapshot.remote(shard, "move")  # what receive_shard asks for
    await a.drop_snapshot.remote(snap["id"])
    seq = snap["seq"]
    for k in range(4 * KEEP):
        await pair.write(entity, f"{entity}::s2::{k}", f"later note {k}")

    async def trimmed_past(after: int) -> bool:
        try:
            await a.changes_since.remote(shard, after, 1)
            return False
        except NodeError as exc:
            assert "trimmed" in str(exc) and "new snapshot" in str(exc)
            return True

    # The node trims its logs after a pause in writes: down to the pin, not to the newest KEEP.
    deadline = time.monotonic() + 60
    while not await trimmed_past(seq - 1) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await trimmed_past(seq - 1)
    kept = await a.changes_since.remote(shard, seq, 1000)
    assert [c.seq for c in kept] == list(range(seq + 1, seq + 1 + 4 * KEEP))

    await a.unfence.remote(shard)  # a move's end releases its pin; the next trim goes past the copy
    await pair.write(entity, f"{entity}::s3::0", "one more note")
    deadline = time.monotonic() + 60
    while not await trimmed_past(seq) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await trimmed_past(seq), "the log was not trimmed past the released pin"


async def test_a_free_form_id_whose_home_shard_moves_stays_one_memory(pair):
    home = B_SHARDS[0]
    mid = next(m for m in (f"free-note-{i}" for i in range(10_000)) if pair.placement.id_home(m) == home)
    first = entities_on(pair.placement, B_SHARDS[2], "free-one", 1)[0]  # held by B, the home's first node
    second = entities_on(pair.placement, A_SHARDS[1], "free-two", 1)[0]

    async def write_free(entity: str, text: str) -> None:
        node = pair.node(home)  # the id's home node serialises its writes
        await node.ingest_free.remote([item(pair.placement, entity, mid, text)])

    await write_free(first, "a note that wanders between entities")
    await pair.move(home)  # the home record moves with its shard, B -> A
    assert pair.placement.node_of_shard(home) == A
    await write_free(second, "a note that wanders between entities, again")

    found = await pair.node(home).inspect_free.remote(mid, False, 0)
    assert found is not None and found["entity_id"] == second
    first_shard = pair.placement.shard_of(first)
    assert await pair.node(first_shard).inspect.remote(mid, [first_shard], False, 0) is None
    held = 0
    for name, actor in pair.actors.items():
        hits = await actor.query.remote("a note that wanders", None, pair.placement.shards_of(name), 1000)
        held += sum(h["memory_id"] == mid for h in hits)
    assert held == 1


# ---- without Ray: the write gate, and a node's start ----------------------------------------------


async def test_a_fence_refuses_new_writes_and_waits_for_those_in_flight():
    from node.shard_set import Gate

    gate = Gate()
    go_on = asyncio.Event()

    async def write() -> None:
        with gate.writing([3, 4]):
            await go_on.wait()

    writing = asyncio.create_task(write())
    await asyncio.sleep(0)
    fencing = asyncio.create_task(gate.fence(3))
    await asyncio.sleep(0.05)
    assert not fencing.done()  # the write that passed its entry is waited for
    with pytest.raises(NotOwnedError, match="moving"):
        with gate.writing([2, 3]):
            pass
    with gate.writing([4]):  # other shards are not fenced
        pass
    go_on.set()
    await writing
    await fencing
    gate.unfence(3)
    with gate.writing([3]):
        pass


@pytest.fixture
async def plain_node(tmp_path):
    from node.config import ClusterConfig, EmbeddingConfig
    from node.service import Node

    (tmp_path / "shards" / "0001.incoming").mkdir(parents=True)  # a copy a crash interrupted
    (tmp_path / "shards" / "0001.incoming" / "store.sqlite3").write_bytes(b"half a copy")
    config = ClusterConfig(data_dir=str(tmp_path), shards=4, nodes=1, embedding=EmbeddingConfig(backend="torch"))
    n = Node("node-0", config, [0, 1, 2, 3])
    yield n
    await n.close()


async def test_a_node_removes_unfinished_copies_at_start_and_its_fence_waits_for_a_commit(plain_node, tmp_path):
    node = plain_node
    assert not list((tmp_path / "shards").glob("*.incoming"))
    placement = Placement(4, ("node-0",))
    entity = entities_on(placement, 2, "fence", 1)[0]
    items = [item(placement, entity, f"{entity}::s1::{k}", f"note {k} about the harbour") for k in range(50)]
    writing = asyncio.create_task(node.ingest(items))
    while not node.moves.gate._inflight.get(2):  # embedded, queued for its commit
        await asyncio.sleep(0.001)
    seq = await node.fence(2)
    assert writing.done() and writing.result() == [None] * 50  # it finished before the fence did
    assert seq == (await node.shard_seq(2)) >= 50
    assert len(await node.changes_since(2, seq - 50, 1000)) == 50
    with pytest.raises(NotOwnedError):
        await node.ingest([item(placement, entity, f"{entity}::s1::99", "refused")])
    assert len(await node.query("the harbour", entity, 2, 100)) == 50  # reads go on
    await node.unfence(2)
    assert await node.ingest([item(placement, entity, f"{entity}::s1::99", "accepted")]) == [None]


async def test_a_new_authority_settles_what_a_stopped_one_left_mid_move(pair):
    """With GCS fault tolerance the nodes outlive an authority that stopped mid-move: a fence and a
    received copy stay behind. Its successor settles each node once (node.control.authority): before the
    flip was saved the copy is dropped and the fence lifted; after it, the copy is adopted, the
    fence lifted and the old copy released."""
    before, after = B_SHARDS[3], B_SHARDS[4]
    entities = {}
    for shard in (before, after):
        entities[shard] = entities_on(pair.placement, shard, "settle-user", 1)[0]
        await pair.seed([entities[shard]], "s")
        await pair.actors[A].receive_shard.remote(shard, B)
        await pair.actors[B].fence.remote(shard)
    await pair.actors[A].catch_up.remote(after, B)
    flipped = pair.placement.with_owner(after, A)  # saved by the stopped authority, never pushed
    on_a = await pair.actors[A].settle.remote(flipped)
    on_b = await pair.actors[B].settle.remote(flipped)
    assert after in on_a["adopted"] and before in on_a["dropped"] and not on_a["released"]
    assert {before, after} <= set(on_b["unfenced"]) and on_b["released"] == [after]
    assert (await pair.actors[A].stats.remote())["moves"] == {} == (await pair.actors[B].stats.remote())["moves"]
    pair.placement = flipped
    await pair.write(entities[before], f"{entities[before]}::after-settle::0", "B takes writes again")
    await pair.write(entities[after], f"{entities[after]}::after-settle::0", "A owns this shard now")
    with pytest.raises(NotOwnedError):
        await pair.actors[B].ingest.remote([item(flipped, entities[after], f"{entities[after]}::x::0", "refused")])
    assert not shard_dir(pair.dirs[B], after).exists() and shard_dir(pair.dirs[A], after).exists()
    assert not shard_dir(pair.dirs[A], before).exists()
