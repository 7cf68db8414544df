"""The placement authority's record: it survives a restart, and changes only as the operator may ask."""

from __future__ import annotations

import pytest

from node.control import placement_file
from node.control.authority import NotReady, PlacementAuthority, PlacementError, UnknownNode
from node.control.placement import Placement


def saved(tmp_path, placement: Placement) -> str:
    """A head data directory that holds `placement` (a cluster that ran before)."""
    placement_file.save(tmp_path / "placement.json", placement)
    return str(tmp_path)


async def test_the_placement_survives_a_restart_of_the_head(tmp_path):
    first = PlacementAuthority(str(tmp_path), 16, ["a", "b"])
    await first.join("a", {})
    await first.join("b", {})  # every shard has a joined copy: the new cluster's placement is saved
    moved = first._placement.with_nodes(("a", "b", "c"))
    first._set(moved.with_owner(moved.moves()[0][0], "c"))
    again = PlacementAuthority(str(tmp_path), 16, ["a", "b"])  # cluster.yaml's initial nodes no longer decide
    assert again._placement == first._placement and again._placement.epoch == 3
    with pytest.raises(PlacementError, match="shard count cannot change"):
        PlacementAuthority(str(tmp_path), 32, ["a", "b"])


def test_serve_takes_its_nodes_from_cluster_yaml_at_each_start(tmp_path):
    PlacementAuthority(str(tmp_path), 8, ["node-0", "node-1"], movable=False)
    again = PlacementAuthority(str(tmp_path), 8, ["node-0", "node-1", "node-2"], movable=False)
    assert again._placement == Placement(8, ("node-0", "node-1", "node-2"))


async def test_members_change_only_as_the_operator_may_ask(tmp_path):
    authority = PlacementAuthority(str(tmp_path), 8, ["a"])
    with pytest.raises(UnknownNode, match="has not joined"):
        await authority.add_node("b")
    with pytest.raises(UnknownNode, match="not a member"):
        await authority.remove_node("zz")
    with pytest.raises(PlacementError, match="last member"):
        await authority.remove_node("a")
    serve = PlacementAuthority(str(tmp_path / "serve"), 8, ["a"], movable=False)
    await serve.join("b", {})
    with pytest.raises(PlacementError, match="one data directory"):
        await serve.add_node("b")


async def test_a_rebalance_waits_for_both_ends_of_a_move_to_have_joined(tmp_path):
    authority = PlacementAuthority(saved(tmp_path, Placement(8, ("a",))), 8, ["a"])
    await authority.join("b", {"pid": 1})
    started = await authority.add_node("b")
    assert started["nodes"] == ["a", "b"] and started["pending_moves"] > 0
    await authority._rebalance  # "a" never joined: nothing can move, and the status says why
    status = await authority.status()
    assert "waiting for node 'a' to join" in status["error"] and not status["rebalancing"]
    assert status["owner"] == list(Placement(8, ("a",)).owner) and status["epoch"] == 2
    assert status["members"]["b"] == {"member": True, "joined": True, "shards": [], "copies": [], "up": True, "pid": 1}


async def test_a_node_silent_past_rebuild_after_s_stops_being_a_member(tmp_path):
    """Pings fail (these nodes have no actors), so after failover_after_s and rebuild_after_s the
    authority drops a member to have its copies rebuilt elsewhere, but never the last one."""
    import asyncio

    authority = PlacementAuthority(str(tmp_path), 8, ["a", "b"], replication=2, failover_after_s=0.05,
                                   rebuild_after_s=0.2)
    authority.PING_EVERY_S = 0.05
    await authority.join("a", {})
    await authority.join("b", {})
    for _ in range(100):
        await asyncio.sleep(0.05)
        if len(authority._placement.nodes) == 1:
            break
    status = await authority.status()
    assert set(status["down"]) == {"a", "b"} and len(status["nodes"]) == 1
    assert status["pending_moves"] > 0  # the dropped member's copies wait for a live node to copy from
    authority._watcher.cancel()


async def test_a_head_without_its_disk_rebuilds_the_placement_from_the_nodes(tmp_path):
    """The highest epoch a joining node brings wins; nothing is saved, and no member change starts,
    until every shard has a joined copy."""
    old = Placement(8, ("a", "b"), replication=2)
    old = old.with_primary(0, old.replicas[0][1])  # a failover happened: epoch 2
    stale = Placement(8, ("a", "b"), replication=2)
    authority = PlacementAuthority(str(tmp_path), 8, ["a", "b"], replication=2)
    assert authority.recovering and not (tmp_path / "placement.json").exists()
    await authority.join("a", {}, stale)
    assert (await authority.summary())["recovering"] is False  # "a" holds a copy of every shard
    authority2 = PlacementAuthority(str(tmp_path / "h2"), 8, ["a", "b"], replication=2)
    await authority2.join("a", {}, stale)
    await authority2.join("b", {}, old)
    assert authority2._placement == old
    assert placement_file.load(tmp_path / "h2" / "placement.json") == old
    authority._watcher.cancel()
    authority2._watcher.cancel()


async def test_recovery_waits_for_a_copy_of_every_shard(tmp_path):
    authority = PlacementAuthority(str(tmp_path), 8, ["a", "b", "c"])
    await authority.join("a", {})
    assert authority.recovering
    with pytest.raises(NotReady, match="have not joined"):
        await authority.remove_node("a")
    assert (await authority.summary())["rejoining"] == ["b", "c"]
    await authority.join("b", {})
    await authority.join("c", {})
    assert not authority.recovering and (tmp_path / "placement.json").exists()
    authority._watcher.cancel()


class FakeNode:
    """A node actor's `replication_status`, as `handles.get(name).replication_status.remote()` answers it."""

    def __init__(self, report: dict) -> None:
        self.replication_status = self
        self.report = report

    async def remote(self) -> dict:
        return self.report


class FakeHandles:
    def __init__(self, reports: dict[str, dict]) -> None:
        self.reports = reports

    def get(self, name: str, fresh: bool = False) -> FakeNode:
        if name not in self.reports:
            raise ValueError(f"no actor {name}")
        return FakeNode(self.reports[name])

    def forget(self, name: str) -> None:
        pass


async def test_the_status_has_each_shards_copies_and_says_which_are_under_replicated(tmp_path):
    """Replication health is the authority's: per shard its copies' seqs, lag and liveness, and the
    shards short of live copies (a follower the primary finds down)."""
    p = Placement(2, ("a", "b"), replication=2)
    authority = PlacementAuthority(saved(tmp_path, p), 2, ["a", "b"], replication=2)
    await authority.join("a", {})
    await authority.join("b", {})
    authority._watcher.cancel()
    reports = {n: {"shards": {}} for n in ("a", "b")}
    for s in range(2):
        primary, follower = p.replicas[s]
        reports[primary]["shards"][s] = {"role": "primary", "seq": 10, "followers": {
            follower: {"acked": 10 if s == 0 else 4, "live": s == 0, "lag": 0 if s == 0 else 6}}}
        reports[follower]["shards"][s] = {"role": "follower", "seq": 10 if s == 0 else 4}
    authority.handles = FakeHandles(reports)
    status = await authority.status()
    assert status["under_replicated"] == [1]
    detail = {d["shard"]: d for d in status["shards_detail"]}
    assert detail[0]["lag"] == 0 and detail[0]["seq"] == 10 and detail[0]["primary"] == p.replicas[0][0]
    assert [c["live"] for c in detail[0]["copies"]] == [True, True]
    assert detail[1]["lag"] == 6 and detail[1]["copies"][1] == {
        "node": p.replicas[1][1], "role": "follower", "seq": 4, "acked": 4, "live": False, "lag": 6,
        "state": "catching up"}


async def test_right_after_add_node_a_new_copy_is_joining_or_catching_up_not_down(tmp_path):
    """A node just added holds a copy its primary has not linked yet (the placement flipped, the
    push of it is on its way) and is behind: it is catching up. A copy on a node that has not
    joined (yet, or again) is joining; only one on a node the authority finds silent is down."""
    p = Placement(2, ("a",), replication=2)
    authority = PlacementAuthority(saved(tmp_path, p), 2, ["a"], replication=2)
    await authority.join("a", {})
    await authority.join("b", {})
    authority._watcher.cancel()
    authority._set(authority._placement.with_nodes(("a", "b")).with_copy_added(0, "b").with_copy_added(1, "c"))
    authority.handles = FakeHandles({"a": {"shards": {0: {"role": "primary", "seq": 9, "followers": {}},
                                                      1: {"role": "primary", "seq": 9, "followers": {}}}},
                                     "b": {"shards": {0: {"role": "follower", "seq": 5}}}})
    status = await authority.status()
    copies = {d["shard"]: d["copies"] for d in status["shards_detail"]}
    assert copies[0][1]["node"] == "b" and not copies[0][1]["live"] and copies[0][1]["state"] == "catching up"
    assert copies[1][1]["node"] == "c" and copies[1][1]["state"] == "joining"
    assert copies[0][0]["state"] == "live" and status["under_replicated"] == [0, 1]
    authority.down_since["b"] = 0.0
    status = await authority.status()
    assert status["shards_detail"][0]["copies"][1]["state"] == "down"


def test_serve_keeps_its_saved_placement_while_its_nodes_stay_the_same(tmp_path):
    """A data directory made by an older version (its copies where the ring put them) keeps them:
    with replicas each node's folder holds the copies that placement gave it."""
    ring_made = Placement(8, ("node-0", "node-1"), replication=2,
                          replicas=(("node-1", "node-0"),) * 6 + (("node-0", "node-1"),) * 2)
    saved(tmp_path, ring_made)
    again = PlacementAuthority(str(tmp_path), 8, ["node-1", "node-0"], movable=False, replication=2)
    assert again._placement == ring_made


async def test_a_follower_its_primary_reports_down_is_recorded_behind_until_live_again(tmp_path):
    authority = PlacementAuthority(str(tmp_path), 4, ["a", "b"], replication=2)
    await authority.join("a", {})
    await authority.join("b", {})  # every shard has a joined copy: the placement is saved from now on
    p = authority._placement
    shard = p.primaries_of("a")[0]
    epoch = p.epoch
    await authority._record_behind("a", {shard: {"b": False}})
    assert authority._placement.behind == ((shard, "b"),) and authority._placement.epoch == epoch + 1
    await authority._record_behind("b", {shard: {"a": True}})  # b is not that shard's primary: ignored
    await authority._record_behind("a", {shard: {"b": False}})  # already recorded: no new epoch
    assert authority._placement.epoch == epoch + 1
    again = PlacementAuthority(str(tmp_path), 4, ["a", "b"], replication=2)  # saved with the placement
    assert again._placement.behind == ((shard, "b"),)
    handed = authority._placement.with_primary(shard, "b")  # a copy that becomes the primary is not behind
    assert handed.behind == () and Placement.from_json(authority._placement.to_json()) == authority._placement
    await authority._record_behind("a", {str(shard): {"b": True}})  # live again (JSON keys are strings)
    assert authority._placement.behind == ()


async def test_a_node_that_joins_with_a_zone_puts_it_in_the_placement(tmp_path):
    authority = PlacementAuthority(str(tmp_path), 8, ["a", "b", "c"], replication=2)
    for name, zone in (("a", "east"), ("b", "east"), ("c", "west")):
        await authority.join(name, {"zone": zone})
    p = authority._placement
    assert dict(p.zones) == {"a": "east", "b": "east", "c": "west"}
    target = p.target()
    assert all({dict(p.zones)[n] for n in copies} == {"east", "west"} for copies in target)  # one copy in each
    epoch = p.epoch
    await authority.join("c", {"zone": "west"})  # the same zone again: no new epoch
    assert authority._placement.epoch == epoch


async def test_rebalance_starts_the_pending_moves_with_the_members_as_they_are(tmp_path):
    uneven = Placement(8, ("a", "b"), owner=("a",) * 7 + ("b",))  # as an older version's ring left it
    authority = PlacementAuthority(saved(tmp_path, uneven), 8, ["a", "b"])
    await authority.join("a", {})
    await authority.join("b", {})
    assert authority._placement.moves() and authority._rebalance is None  # nothing moves unasked
    started = await authority.rebalance()
    assert started["pending_moves"] == 3 and started["rebalancing"] and started["nodes"] == ["a", "b"]
    authority._rebalance.cancel()
    serve = PlacementAuthority(str(tmp_path / "serve"), 8, ["a", "b"], movable=False)
    with pytest.raises(PlacementError, match="cannot move"):
        await serve.rebalance()
