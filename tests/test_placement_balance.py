"""Balanced placement (node.control.balance): every node within one copy and one primary of the mean,
for any node count, with the fewest moves on a join or a leave; copies of a shard on distinct nodes
and, when nodes carry zones, distinct zones; an old uneven placement (the consistent-hash ring's) is
evened out by moves."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from node.control.balance import balance
from node.control.placement import Placement

SHARDS = 64


def names(n: int) -> tuple[str, ...]:
    return tuple(f"node-{i}" for i in range(n))


def assert_balanced(p: Placement) -> None:
    copies = Counter(n for r in p.replicas for n in r)
    primaries = Counter(p.owner)
    copy_mean = p.shards * min(p.replication, len(p.nodes)) / len(p.nodes)
    for node in p.nodes:
        assert abs(copies[node] - copy_mean) < 1, (node, copies, copy_mean)
        assert abs(primaries[node] - p.shards / len(p.nodes)) < 1, (node, primaries)
    assert set(copies) <= set(p.nodes)
    assert all(len(set(r)) == len(r) == min(p.replication, len(p.nodes)) for r in p.replicas)


def step(p: Placement, move: tuple[int, str | None, str | None]) -> Placement:
    shard, source, target = move
    return (p.with_copy_added(shard, target) if source is None else
            p.with_copy_dropped(shard, source) if target is None else p.with_copy_moved(shard, source, target))


def settle(p: Placement) -> tuple[Placement, int, int]:
    """Carry out the plan as the move driver does: copy moves one at a time (asking again after
    each), then the handover plan whole; after that nothing is left to do."""
    moved = handed = 0
    while p.moves():
        p = step(p, p.moves()[0])
        moved += 1
    for shard, _, node in p.handovers():  # the plan whole, as the driver carries it out
        p = p.with_primary(shard, node)
        handed += 1
    assert not p.moves() and not p.handovers()
    return p, moved, handed


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("nodes", range(2, 17))
def test_a_new_placement_has_every_node_within_one_shard_of_the_mean(nodes, replication):
    p = Placement(SHARDS, names(nodes), replication=replication)
    assert_balanced(p)
    assert not p.moves() and not p.handovers()
    assert p == Placement(SHARDS, names(nodes), replication=replication)  # deterministic


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("nodes", range(2, 17))
def test_a_join_moves_only_the_new_nodes_share(nodes, replication):
    before = Placement(SHARDS, names(nodes - 1), replication=replication)
    grown = before.with_nodes(names(nodes))
    planned = grown.moves()
    assert {to for _, _, to in planned} == {f"node-{nodes - 1}"}  # nothing moves between the old nodes
    bound = math.ceil(SHARDS * min(replication, nodes) / nodes) + 1  # its share of copies, +1
    assert len(planned) <= bound, (len(planned), bound)
    assert step(grown, planned[0]).moves() == planned[1:]  # the rest of the same plan
    after, moved, _ = settle(grown)
    assert moved == len(planned)  # the plan holds as it is carried out, one move at a time
    assert_balanced(after)


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("nodes", range(3, 17))
def test_a_leave_moves_only_the_leaving_nodes_copies(nodes, replication):
    before = Placement(SHARDS, names(nodes), replication=replication)
    gone = names(nodes)[nodes // 2]
    shrunk = before.with_nodes(tuple(n for n in names(nodes) if n != gone))
    assert {source for _, source, _ in shrunk.moves()} == {gone}
    assert len(shrunk.moves()) == sum(gone in r for r in before.replicas)
    after, _, _ = settle(shrunk)
    assert_balanced(after)


def test_a_ring_placement_from_an_older_version_is_evened_out():
    counts = [1, 14, 8, 9, 6, 10, 7, 9]  # 64 shards on 8 nodes as the ring left them (issue 23)
    owner = tuple(n for n, c in zip(names(8), counts) for _ in range(c))
    old = Placement.from_json({"shards": 64, "nodes": list(names(8)), "epoch": 7, "owner": list(owner)})
    assert old.owner == owner  # read as it is
    assert len(old.moves()) == sum(max(0, c - 8) for c in counts)  # only the excess over the mean moves
    after, moved, _ = settle(old)
    assert_balanced(after)
    assert moved == 10


@pytest.mark.parametrize("replication", [2, 3])
def test_copies_of_a_shard_go_to_distinct_zones(replication):
    zones = {n: f"zone-{i % 3}" for i, n in enumerate(names(6))}
    p = Placement(SHARDS, names(6), replication=replication, zones=tuple(sorted(zones.items())))
    assert all(len({zones[n] for n in r}) == replication for r in p.replicas)
    assert_balanced(p)
    grown = p.with_nodes(names(6) + ("node-6",)).with_zones({**zones, "node-6": "zone-0"})
    after, _, _ = settle(grown)
    assert after.zones == grown.zones
    assert all(len({dict(after.zones)[n] for n in r}) == replication for r in after.replicas)
    assert Placement.from_json(after.to_json()) == after


def test_a_zoneless_placement_that_learns_its_zones_spreads_its_copies():
    p = Placement(SHARDS, names(4), replication=2)
    zones = {"node-0": "a", "node-1": "a", "node-2": "b", "node-3": "b"}
    zoned, _, _ = settle(p.with_zones(zones))
    assert all({zones[n] for n in r} == {"a", "b"} for r in zoned.replicas)
    assert_balanced(zoned)


def test_fewer_zones_than_copies_still_spreads_copies_over_nodes():
    copies = balance([()] * 8, names(3), 3, {"node-0": "a", "node-1": "a", "node-2": "b"})
    assert all(len(set(r)) == 3 for r in copies)


def test_a_large_cluster_balances_in_one_pass():
    p = Placement(16384, tuple(f"n{i}" for i in range(1000)), replication=2)
    assert_balanced(p)
    grown = p.with_nodes((*p.nodes, "n1000"))
    assert len(grown.moves()) <= math.ceil(16384 * 2 / 1001) + 1
    after, _, handed = settle(grown)  # one at a time, the handovers asked for again could go round
    assert_balanced(after)
    assert handed > 0


def test_a_placement_read_from_json_pickles_as_small_as_one_built_here():
    """The authority pushes the placement to every node at every epoch: a name is pickled once."""
    import json
    import pickle

    p = Placement(1024, names(50), replication=2)
    read = Placement.from_json(json.loads(json.dumps(p.to_json())))
    assert read == p and len(pickle.dumps(read, protocol=5)) == len(pickle.dumps(p, protocol=5))
