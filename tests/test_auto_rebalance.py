"""Rebalancing on its own, when asked to (`auto_rebalance`): a node that joins becomes a member and
gets its share; without it data moves only on an operator's command. Moves are paced to
`rebalance.max_bytes_per_s`. In process (the authority without node actors), then end to end."""

from __future__ import annotations

import asyncio
import time

import pytest

from node.control import placement_file
from node.control.authority import PlacementAuthority
from node.control.placement import Placement
from node.control.autobalance import pause_after


def saved(tmp_path, placement: Placement) -> str:
    placement_file.save(tmp_path / "placement.json", placement)
    return str(tmp_path)


def stop(authority: PlacementAuthority) -> None:
    for task in (authority._watcher, authority._rebalance):
        if task is not None:
            task.cancel()


@pytest.mark.parametrize("auto", [True, False])
async def test_a_joining_node_becomes_a_member_only_with_auto_rebalance(tmp_path, auto):
    authority = PlacementAuthority(saved(tmp_path, Placement(16, ("a", "b", "c"))), 16, ["a", "b", "c"],
                                   auto_rebalance=auto)
    for name in ("a", "b", "c", "d"):
        await authority.join(name, {})
    summary = await authority.summary()
    assert summary["auto_rebalance"] is auto
    if auto:  # as `add_node d` would: d is a member and its share of shards is to move to it
        assert summary["nodes"] == ["a", "b", "c", "d"] and summary["epoch"] == 2
        assert summary["pending_moves"] == 4 and all(to == "d" for _, _, to in authority._placement.moves())
        assert authority._rebalance is not None
    else:
        assert summary["nodes"] == ["a", "b", "c"] and summary["epoch"] == 1 and summary["pending_moves"] == 0
        assert authority._rebalance is None
    stop(authority)


async def test_a_node_the_operator_removed_stays_out_until_added_again(tmp_path):
    """With auto_rebalance, a joined node that is not a member is normally made one: not one that
    `remove_node` took out (the next join of any node would undo the operator's command), not even
    after a restart of the head; `add_node` brings it back."""
    authority = PlacementAuthority(saved(tmp_path, Placement(8, ("a", "b"))), 8, ["a", "b"], auto_rebalance=True)
    await authority.join("a", {})
    await authority.join("b", {})
    await authority.remove_node("b")
    await authority.join("c", {})
    assert authority._placement.nodes == ("a", "c")
    stop(authority)
    again = PlacementAuthority(str(tmp_path), 8, ["a", "b"], auto_rebalance=True)
    for name in ("a", "b", "c"):
        await again.join(name, {})
    assert again._placement.nodes == ("a", "c")
    await again.add_node("b")
    assert again._placement.nodes == ("a", "c", "b")
    stop(again)


@pytest.mark.parametrize("auto, asked", [(False, False), (True, False), (False, True)])
async def test_after_a_head_restart_pending_moves_go_on_only_if_asked_for(tmp_path, auto, asked):
    """An older version's placement (the ring's, uneven) has moves pending under the balanced
    placement: a restarted head starts them only with auto_rebalance, or when a rebalance was asked
    for and had not finished (recorded next to placement.json)."""
    uneven = Placement(8, ("a", "b"), owner=("a",) * 6 + ("b",) * 2)
    assert uneven.moves()
    if asked:
        first = PlacementAuthority(saved(tmp_path, Placement(8, ("a",))), 8, ["a"])
        await first.join("b", {})
        await first.add_node("b")  # "a" never joined: the rebalance waits, unfinished
        await first._rebalance
        stop(first)
    else:
        saved(tmp_path, uneven)
    again = PlacementAuthority(str(tmp_path), 8, ["a", "b"], auto_rebalance=auto)
    await again.join("a", {})
    await again.join("b", {})
    assert again._placement.moves()
    assert (again._rebalance is not None) is (auto or asked)
    stop(again)


async def test_a_member_lost_past_rebuild_after_s_is_a_member_again_when_it_answers(tmp_path):
    """Failover takes a node silent for rebuild_after_s out of the members (with or without
    auto_rebalance); with it, the node is a member again once it answers."""
    authority = PlacementAuthority(saved(tmp_path, Placement(8, ("a", "b", "c"))), 8, ["a", "b", "c"],
                                   failover_after_s=0.05, rebuild_after_s=0.1, auto_rebalance=True)
    authority.PING_EVERY_S = 0.02
    actors = {n: FakeActor() for n in ("a", "b", "c")}
    authority.handles = FakeHandles(actors)
    for name in actors:
        await authority.join(name, {})
    actors["c"].up = False
    await until(lambda: "c" not in authority._placement.nodes)
    actors["c"].up = True
    await until(lambda: "c" in authority._placement.nodes)
    assert authority._placement.nodes == ("a", "b", "c")
    stop(authority)


def test_the_pause_after_a_move_keeps_the_average_rate_under_the_limit():
    mb = 1_000_000
    assert pause_after(100 * mb, 0.5, 50 * mb) == pytest.approx(1.5)  # 100 MB at 50 MB/s: 2 s in all
    assert pause_after(100 * mb, 3.0, 50 * mb) == 0.0  # slower than the limit already
    assert pause_after(100 * mb, 0.5, 0) == 0.0  # 0: no limit
    assert pause_after(0, 0.0, 50 * mb) == 0.0  # a dropped copy moves no bytes
    seconds = 0.25
    assert (100 * mb) / (seconds + pause_after(100 * mb, seconds, 50 * mb)) == pytest.approx(50 * mb)


async def test_moves_are_paced_by_max_bytes_per_s(tmp_path):
    """After a move of B bytes that took t seconds the rebalance waits B / max_bytes_per_s - t (the
    status adds up the waits); a move of no bytes, or no limit, waits not at all."""
    authority = PlacementAuthority(saved(tmp_path, Placement(4, ("a",))), 4, ["a"], max_bytes_per_s=1000)
    await authority._pace({"state": "done", "bytes": 50, "seconds": 0.01})
    await authority._pace({"state": "done", "bytes": 0, "seconds": 0.0})
    summary = await authority.summary()
    assert summary["max_bytes_per_s"] == 1000 and summary["paced_s"] == pytest.approx(0.04)
    unlimited = PlacementAuthority(str(tmp_path / "u"), 4, ["a"], max_bytes_per_s=0)
    await unlimited._pace({"state": "done", "bytes": 10**9, "seconds": 0.01})
    assert (await unlimited.summary())["paced_s"] == 0
    stop(authority)
    stop(unlimited)


def test_cluster_status_says_whether_data_moves_on_its_own_and_how_fast():
    from router.cluster_cli import format_status

    status = {"epoch": 3, "shards": 8, "pending_moves": 2, "rebalancing": False, "error": None, "members": {},
              "auto_rebalance": False, "max_bytes_per_s": 50_000_000}
    text = format_status(status)
    assert "auto-rebalance off" in text and "moves at most 50 MB/s" in text
    assert "2 moves wait for a command (`tellodb cluster rebalance` starts them)" in text
    text = format_status({**status, "auto_rebalance": True, "max_bytes_per_s": 0, "pending_moves": 0})
    assert "auto-rebalance on" in text and "moves unlimited" in text and "wait for" not in text


# ---- end to end ---------------------------------------------------------------------------------

def test_a_node_started_in_a_cluster_with_auto_rebalance_gets_its_share(tmp_path, model_seed):
    """Three `tellodb node`s with `auto_rebalance: true`; a fourth is started and nothing else is
    done: it becomes a member and ends up with its share of the shards (within one of the mean),
    and every write acknowledged before is still there through the router."""
    from tellodb import TellodbClient

    from conftest import API_KEY, cluster_status
    from loadtest.local_cluster import LocalCluster

    c = LocalCluster(tmp_path / "cluster", API_KEY, shards=16, nodes=("n1", "n2", "n3"), model_seed=model_seed,
                     extra_config={"auto_rebalance": "true"})
    try:
        c.start_head()
        c.start_nodes(["n1", "n2", "n3"])
        [router] = c.start_routers(1)
        client = TellodbClient.from_cloud(base_url=router.url, api_key=API_KEY)
        written = {}
        for i in range(16):
            entity, text = f"grow:user-{i}", f"user {i} keeps a blue notebook of {i} recipes"
            client.ingest(entity_id=entity, text=text, memory_id=f"{entity}::notes::0", timestamp=1_700_000_000_000)
            written[f"{entity}::notes::0"] = (entity, text)
        first = cluster_status(c, router.url)
        assert first["auto_rebalance"] is True and sorted(first["nodes"]) == ["n1", "n2", "n3"]

        c.start_nodes(["n4"])  # no add-node command
        deadline = time.monotonic() + 300
        while True:
            status = cluster_status(c, router.url)
            if "n4" in status["nodes"] and not status["pending_moves"] and not status["moving"]:
                break
            assert not status["error"] or status["rebalancing"], status["error"]
            assert time.monotonic() < deadline, {k: status[k] for k in ("nodes", "pending_moves", "moving")}
            time.sleep(1)
        counts = {n: len(m["shards"]) for n, m in status["members"].items() if m["member"]}
        assert sorted(counts) == ["n1", "n2", "n3", "n4"] and all(3 <= k <= 5 for k in counts.values()), counts
        assert status["epoch"] > first["epoch"] and status["moved_shards"] == counts["n4"]
        for memory_id, (entity, text) in written.items():
            found = client.inspect_memory(memory_id)
            assert found["entity_id"] == entity and found["textual_content"] == text
        hits = client.query("who keeps a notebook of recipes", entity_id="grow:user-3", top_k=1)
        assert [h.memory_id for h in hits] == ["grow:user-3::notes::0"]
    finally:
        c.close()


# ---- helpers of the in-process tests --------------------------------------------------------------

async def until(condition, limit: int = 500) -> None:
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never held")


class FakeActor:
    """A node actor that answers `ping` while up; other calls answer nothing (moves then fail, and
    the rebalance stops with an error: these tests look at the members only)."""

    def __init__(self) -> None:
        self.up = True

    def __getattr__(self, method: str):
        actor = self

        class Method:
            async def remote(self, *args, **kwargs):
                if not actor.up:
                    raise ConnectionError("not answering")
                return {} if method == "ping" else None

        return Method()


class FakeHandles:
    def __init__(self, actors: dict[str, FakeActor]) -> None:
        self.actors = actors

    def get(self, name: str, fresh: bool = False) -> FakeActor:
        return self.actors[name]

    def forget(self, name: str) -> None:
        pass
