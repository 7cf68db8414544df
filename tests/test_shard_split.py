"""Shards that split while they serve (node.splits, node.control.splitting, Placement.with_split): the
hash ranges of a placement, one half of a shard file, and the primary's side of a split on real Ray,
SQLite, Chroma and the model, with a writer that goes on through it. End to end, through routers and
the CLI: tests/test_split_end_to_end.py."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import shutil
import sqlite3

import pytest
import ray

from node import id_homes
from node.actor import NodeActor
from node.control.placement import Placement
from node.errors import NodeError, NotOwnedError
from node.ids import parse_memory_id, stable_hash
from node.names import NAMESPACE, actor_name
from node.records import IngestItem, ShardList
from node.splits import finish_on_disk, staging_dir
from node.store.split import keep_half

ENTITIES = [f"user-{i}" for i in range(4000)]


# ---- the placement's hash ranges ------------------------------------------------------------------

def test_a_split_gives_half_of_one_shards_entities_to_a_new_shard():
    p = Placement(8, ("a", "b"))
    q = p.with_split(3)
    assert (q.shards, q.created_shards, q.epoch, q.ranges[3], q.ranges[8]) == (9, 8, p.epoch + 1, (16, 3), (16, 11))
    assert q.replicas[3] == q.replicas[8] == (p.owner[3],)
    moved = [e for e in ENTITIES if q.shard_of(e) != p.shard_of(e)]
    on_3 = [e for e in ENTITIES if p.shard_of(e) == 3]
    assert moved and all(p.shard_of(e) == 3 and q.shard_of(e) == 8 for e in moved)  # nothing else moves
    assert 0.4 < len(moved) / len(on_3) < 0.6
    # split again, the new shard too: every entity is on exactly the shard whose range its hash is in
    r = q.with_split(3).with_split(8).with_split(0)
    assert r.shards == 12 and len(set(r.ranges)) == 12
    for e in ENTITIES:
        h, s = stable_hash(e), r.shard_of(e)
        assert h % r.ranges[s][0] == r.ranges[s][1]
        assert sum(h % m == res for m, res in r.ranges) == 1
    assert r.family(3) == [3, 8, 9, 10] and r.family(10) == [10, 3, 8, 9] and r.family(1) == [1]


def test_a_placement_file_without_ranges_reads_as_before_and_a_split_one_round_trips():
    old = Placement(8, ("a", "b"))
    assert "ranges" not in old.to_json() and "created_shards" not in old.to_json()
    assert Placement.from_json(old.to_json()) == old
    split = old.with_split(5).with_split(8)
    again = Placement.from_json(split.to_json())
    assert again == split and again.created_shards == 8
    assert [again.shard_of(e) for e in ENTITIES] == [split.shard_of(e) for e in ENTITIES]
    assert [old.shard_of(e) for e in ENTITIES] == [stable_hash(e) % 8 for e in ENTITIES]


# ---- one half of a shard file ---------------------------------------------------------------------

def test_each_half_keeps_its_own_entities_and_id_homes_and_no_log(make_store, embedder, tmp_path):
    from node.store.records import MemoryRecord

    p = Placement(2, ("a",))
    after = p.with_split(0)
    entities = [e for e in (f"half-{i}" for i in range(200)) if p.shard_of(e) == 0][:12]
    assert {after.shard_of(e) for e in entities} == {0, 2}
    store = make_store(shard_id=0)
    texts = [f"{e} keeps {k} jars of honey in the cellar" for e in entities for k in range(3)]
    vectors = embedder.encode(texts)
    store.upsert([MemoryRecord(memory_id=f"{e}::s::{k}", entity_id=e, session_id="s", turn_index=k,
                               created_at_ms=1_700_000_000_000 + k, kind=None, textual_content=t,
                               relations=((e, "keeps", "honey"),), vector=v, metrics=(("jars", float(k)),),
                               fact_key=None)
                  for (e, k), t, v in zip(itertools.product(entities, range(3)), texts, vectors)])
    free = [m for m in (f"free-{i}" for i in range(100)) if p.id_home(m) == 0][:10]
    id_homes.record(store, {m: id_homes.Home(0, None) for m in free})
    seq = store.last_seq()
    halves = {}
    for s in (0, 2):
        folder = tmp_path / f"half-{s}"
        folder.mkdir()
        store.snapshot(folder / "store.sqlite3")
        kept = keep_half(folder / "store.sqlite3", s, lambda e, s=s: after.shard_of(e) == s,
                         lambda m, s=s: after.id_home(m) == s)
        halves[s] = make_store(root=folder, shard_id=s)
        assert kept["memories"] == 3 * sum(after.shard_of(e) == s for e in entities)
    ids = {s: {m for (m,) in h.db.execute("SELECT memory_id FROM memories")} for s, h in halves.items()}
    assert ids[0].isdisjoint(ids[2]) and ids[0] | ids[2] == {f"{e}::s::{k}" for e in entities for k in range(3)}
    for s, h in halves.items():
        mine = [e for e in entities if after.shard_of(e) == s]
        assert {e for (e,) in h.db.execute("SELECT entity_id FROM entities")} == set(mine)
        for table in ("relations", "measurements"):
            assert {e for (e,) in h.db.execute(f"SELECT DISTINCT entity_id FROM {table}")} == set(mine)
        homes = {m for (m,) in h.db.execute("SELECT memory_id FROM id_homes")}
        assert homes == {m for m in free if after.id_home(m) == s}
        assert h.changes_since(0) == [] and h.trimmed_to() == h.last_seq() == seq  # copies start from a snapshot
        assert h.meta("shard_id") == str(s)
        h.index_pending()
        hits = h.search(embedder.encode(["jars of honey"])[0], "honey cellar", None, 100)
        assert {x["entity_id"] for x in hits} == set(mine)  # full text and vectors hold this half only
        fts = h.db.execute("SELECT COUNT(*) FROM memories_fts WHERE memories_fts MATCH 'honey'").fetchone()[0]
        assert fts == 3 * len(mine)


def test_a_node_finishes_on_start_only_a_split_its_placement_has(tmp_path):
    """Staging folders of a split whose placement was saved (complete halves) replace the shard at
    start; those of one that was not are dropped."""
    p = Placement(4, ("a",))
    after = p.with_split(1)
    for shard in (1, 4):
        (tmp_path / "shards" / f"{shard:04d}").mkdir(parents=True)
        (tmp_path / "shards" / f"{shard:04d}" / "whole").write_text("the shard before")
        staging_dir(tmp_path, shard).mkdir()
        (staging_dir(tmp_path, shard) / "half").write_text("a half")
    for shard in (1, 4):
        marker = {"shard": 1, "child": 4, "epoch": after.epoch, "seq": 7}
        (staging_dir(tmp_path, shard) / "complete.json").write_text(__import__("json").dumps(marker))
    shutil.copytree(tmp_path / "shards", tmp_path / "unsaved" / "shards")
    finish_on_disk(tmp_path, after, "a")
    for shard in (1, 4):
        assert (tmp_path / "shards" / f"{shard:04d}" / "half").exists()
        assert not (tmp_path / "shards" / f"{shard:04d}" / "whole").exists()
    assert not list((tmp_path / "shards").glob("*.split"))
    finish_on_disk(tmp_path / "unsaved", p, "a")  # the authority never saved it: the shard stays whole
    assert (tmp_path / "unsaved" / "shards" / "0001" / "whole").exists()
    assert not list((tmp_path / "unsaved" / "shards").glob("*.split"))


# ---- the primary's side, on real node actors ------------------------------------------------------

N = "split-a"
_serial = itertools.count()


def item(placement: Placement, entity: str, memory_id: str, text: str) -> IngestItem:
    parsed = parse_memory_id(memory_id)
    return IngestItem(memory_id=memory_id, entity_id=entity, session_id=parsed.session_id,
                      turn_index=parsed.turn_index, created_at_ms=1_700_000_000_000 + next(_serial), textual_content=text,
                      shard=placement.shard_of(entity))


@pytest.fixture(scope="module")
def started(cluster, tmp_path_factory):
    """One node actor for the module's tests: each splits or rolls back a shard of its own."""
    data = tmp_path_factory.mktemp("splits") / "a"
    config = dataclasses.replace(cluster.config, data_dir=str(data), changelog_keep=5)
    actor = NodeActor.options(name=actor_name(N), namespace=NAMESPACE, num_cpus=0,
                              max_concurrency=1024).remote(N, config, Placement(4, (N,)), 1)
    ray.get(actor.info.remote(), timeout=600)
    yield actor, data
    ray.get(actor.close.remote(), timeout=60)
    ray.kill(actor)


@pytest.fixture
def node(started):
    """The module's node actor, its placement now and its data folder."""
    actor, data = started
    return actor, ray.get(actor.get_placement.remote()), data


async def test_a_shard_splits_while_it_is_written_and_nothing_is_lost(node):
    actor, before, data = node
    shard = 2
    after = before.with_split(shard)
    child = after.shards - 1
    entities = [e for e in (f"split-user-{i}" for i in range(400)) if before.shard_of(e) == shard][:16]
    assert {after.shard_of(e) for e in entities} == {shard, child}
    seeded = []
    for e in entities:
        items = [item(before, e, f"{e}::seed::{k}", f"{e} planted {k} tulips by the red fence") for k in range(4)]
        await actor.ingest.remote(items)
        seeded += [it.memory_id for it in items]
    view = {"placement": before}
    acked: list[tuple[str, str]] = []
    refused = 0
    stop = asyncio.Event()

    async def writer() -> None:
        """Writes by the placement it knows, and on NotOwnedError reads it again (as a router does)."""
        nonlocal refused
        for k in itertools.count():
            if stop.is_set():
                return
            e = entities[k % len(entities)]
            while True:
                try:
                    await actor.ingest.remote([item(view["placement"], e, f"{e}::w::{k}", f"note {k} about tulips")])
                    break
                except NotOwnedError:
                    refused += 1
                    view["placement"] = await actor.get_placement.remote()
                    await asyncio.sleep(0.01)
            acked.append((e, f"{e}::w::{k}"))

    task = asyncio.create_task(writer())
    while len(acked) < 10:
        await asyncio.sleep(0.05)
    info = await actor.prepare_split.remote(shard, after)
    assert info["child"] == child and sum(info["memories"].values()) >= len(seeded)
    assert (await actor.stats.remote())["moves"] == {shard: f"splitting into {shard} and {child}"}
    await actor.fence.remote(shard)
    with pytest.raises(NotOwnedError):
        await actor.ingest.remote([item(before, entities[0], f"{entities[0]}::x::0", "refused while fenced")])
    await actor.catch_up_split.remote(shard)
    await actor.adopt_split.remote(shard, after)
    await actor.unfence.remote(shard)
    at_split = len(acked)
    while len(acked) < at_split + 10:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.05)
    stop.set()
    await task

    assert refused > 0 and view["placement"].epoch == after.epoch  # the writer met the fence and the split
    assert await actor.get_placement.remote() == after
    for e, memory_id in [(m.split("::")[0], m) for m in seeded] + acked:
        found = await actor.inspect.remote(memory_id, [after.shard_of(e)], False, 0)
        assert found is not None and found["shard"] == after.shard_of(e), memory_id
    stats = (await actor.stats.remote())["per_shard"]
    assert stats[shard]["memories"] + stats[child]["memories"] == len(seeded) + len(acked)
    assert stats[child]["memories"] > 0 and stats[shard]["memories"] > 0
    # every memory once in a global query, none twice
    hits = await actor.query.remote("tulips", None, ShardList(range(after.shards), after.shards), 1000)
    assert sorted(h["memory_id"] for h in hits if h["entity_id"].startswith("split-user-")) == \
        sorted(seeded + [m for _, m in acked])
    # a request made by the placement before the split is refused, never answered short
    moved = next(e for e in entities if after.shard_of(e) == child)
    for call in (actor.query.remote("tulips", moved, shard, 5),
                 actor.ingest.remote([item(before, moved, f"{moved}::late::0", "by the old placement")]),
                 actor.inspect.remote(f"{moved}::seed::0", [shard], False, 0),
                 actor.query.remote("tulips", None, ShardList(range(before.shards), before.shards), 10)):
        with pytest.raises(NotOwnedError):
            await call
    assert not list((data / "shards").glob("*.split"))
    assert (await actor.stats.remote())["moves"] == {}


async def test_a_split_rolled_back_before_the_flip_leaves_the_shard_as_it_was(node):
    actor, before, data = node
    shard = 1
    entity = next(e for e in (f"undo-{i}" for i in range(400)) if before.shard_of(e) == shard)
    await actor.ingest.remote([item(before, entity, f"{entity}::s::0", "a note that stays")])
    await actor.prepare_split.remote(shard, before.with_split(shard))
    await actor.fence.remote(shard)
    for _ in range(2):  # idempotent
        await actor.abort_split.remote(shard)
        await actor.unfence.remote(shard)
    assert not list((data / "shards").glob("*.split"))
    with pytest.raises(NodeError, match="not splitting"):
        await actor.catch_up_split.remote(shard)
    await actor.ingest.remote([item(before, entity, f"{entity}::s::1", "accepted after the roll-back")])
    assert (await actor.stats.remote())["per_shard"][shard]["memories"] == 2
    assert (await actor.get_placement.remote()) == before
    with pytest.raises(NodeError, match="cannot split"):  # only the next placement, of a primary here
        await actor.prepare_split.remote(shard, before.with_split(shard).with_split(0))
    db = sqlite3.connect(data / "shards" / f"{shard:04d}" / "store.sqlite3")
    try:  # the split's log pin went with the roll-back
        assert db.execute("SELECT COUNT(*) FROM log_pins WHERE name = 'split'").fetchone()[0] == 0
    finally:
        db.close()


# ---- the size policy ------------------------------------------------------------------------------

class StatsOnly:
    """Node actors as the size policy sees them: their stats (each primary's bytes), nothing else."""

    def __init__(self, sizes: dict[str, dict[int, int]]) -> None:
        self.sizes = sizes

    def get(self, name: str, fresh: bool = False):
        sizes = self.sizes[name]

        class Stats:
            async def remote(self):
                return {"per_shard": {s: {"bytes": n} for s, n in sizes.items()}}

        return type("Actor", (), {"stats": Stats()})()

    def forget(self, name: str) -> None:
        pass


async def test_the_size_policy_splits_the_largest_primary_over_max_shard_bytes(tmp_path):
    from node.control.authority import PlacementAuthority

    authority = PlacementAuthority(str(tmp_path), 4, ["a", "b"], max_shard_bytes=1000)
    owner = authority._placement.owner
    bytes_of = {0: 1500, 1: 900, 2: 5000, 3: 10}
    authority.handles = StatsOnly({n: {s: b for s, b in bytes_of.items() if owner[s] == n} for n in ("a", "b")})
    authority.joined = {"a": {}, "b": {}}
    asked = []

    async def split(shard=None):
        asked.append(shard)

    authority.split = split
    await authority._split_largest()
    assert asked == [2]  # the largest of those over the limit
    authority.max_shard_bytes = 10_000
    await authority._split_largest()
    assert asked == [2]

    authority.recovering = False  # (no node brought the placement: this one is the cluster's)
    authority.max_shard_bytes, authority.SPLIT_CHECK_S = 1000, 0.02  # on its own, from the first call
    await authority.summary()
    for _ in range(200):
        if len(asked) > 1:
            break
        await asyncio.sleep(0.01)
    assert asked[1] == 2
    authority._size_policy.cancel()
    if authority._watcher is not None:
        authority._watcher.cancel()


async def test_a_split_saved_by_an_authority_that_then_stopped_is_finished_by_the_next_one(node):
    """The authority saved the split and stopped before the node swapped the halves in: the next
    authority's `settle` (with the split placement) has the node adopt them, and lift the fence."""
    actor, before, data = node
    shard = 3
    after = before.with_split(shard)
    entities = [e for e in (f"settle-{i}" for i in range(400)) if before.shard_of(e) == shard][:8]
    for e in entities:
        await actor.ingest.remote([item(before, e, f"{e}::s::0", f"{e} grows basil on the balcony")])
    await actor.prepare_split.remote(shard, after)
    await actor.fence.remote(shard)
    await actor.catch_up_split.remote(shard)
    done = await actor.settle.remote(after, ())
    assert shard in done["adopted"] and shard in done["unfenced"]
    assert (await actor.get_placement.remote()) == after
    for e in entities:
        found = await actor.inspect.remote(f"{e}::s::0", [after.shard_of(e)], False, 0)
        assert found is not None and found["shard"] == after.shard_of(e)
    moved = next(e for e in entities if after.shard_of(e) == after.shards - 1)
    await actor.ingest.remote([item(after, moved, f"{moved}::s::1", "written after the split")])
    assert not list((data / "shards").glob("*.split"))
