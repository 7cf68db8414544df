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
