"""The placement simulation (loadtest/placement_sim.py) on a small case: its figures agree with each
other and with the placement they describe, and its reports are written."""

from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "loadtest"))
import placement_sim as sim  # noqa: E402

from node.control.failover import Failover  # noqa: E402
from node.control.placement import Placement  # noqa: E402

SHARDS = 64


@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("nodes", [3, 5, 8])
def test_a_join_and_a_leave_are_carried_out_as_planned(nodes, replication):
    row = sim.simulate(SHARDS, nodes, replication)
    copies = SHARDS * replication
    assert row["new"]["copies"]["mean"] == pytest.approx(copies / nodes, abs=1e-3)
    for what, members in (("join", nodes + 1), ("leave", nodes - 1)):
        c = row[what]
        assert c["moves"]["mode"] == "driver"  # small: a balance call after every move
        assert c["moves"]["carried_out"] == c["moves"]["planned"] and c["moves"]["plan_held"]
        assert c["moves"]["balance_calls"] == c["moves"]["planned"] + 1
        assert c["done"] and not c["handovers"]["cycle_after"]
        for kind, total in (("copies", copies), ("primaries", SHARDS)):
            spread = c["after"][kind]
            assert spread["within_one"] and spread["max"] - spread["min"] <= 1
            assert spread["mean"] == pytest.approx(total / members, abs=1e-3)
        # one epoch for the member change, one per move, one per handover; each pushed to every joined node
        assert c["epochs"] == 1 + c["moves"]["carried_out"] + c["handovers_done"]
        assert c["epochs_driver_today"] == 1 + c["moves"]["carried_out"]
        assert c["placements_pushed"] == c["epochs"] * c["receivers"]
        assert c["bytes_pushed"] == c["placements_pushed"] * c["pickle_bytes"]
    join, leave = row["join"], row["leave"]
    # a join moves the new node's share of copies (within one of it), a leave exactly the leaver's copies
    assert abs(join["moves"]["carried_out"] - row["ideal_join_moves"]) < 1
    assert leave["moves"]["carried_out"] == row["new"]["copies"]["max"] or \
        leave["moves"]["carried_out"] == row["new"]["copies"]["min"]
    assert join["receivers"] == nodes + 1 and row["pings_per_s"] == (nodes + 1) / Failover.PING_EVERY_S
    if replication == 2:  # moves bring followers: the new node leads nothing until the handovers
        assert join["new_node_primaries_after_moves"] == 0
        assert join["handovers_done"] >= math.floor(SHARDS / (nodes + 1))
    else:
        assert join["handovers_done"] == 0
        assert join["new_node_primaries_after_moves"] == join["moves"]["carried_out"]


def test_a_plan_too_long_for_the_budget_is_replayed_with_checks():
    grown = Placement(SHARDS, sim.names(4), replication=2).with_nodes(sim.names(5))
    done, found = sim.carry_out(grown, "moves", sim.apply_move, budget_s=0.0)
    assert found["mode"] == "replayed" and found["plan_held"]
    assert found["carried_out"] == found["planned"] == len(grown.moves())
    assert found["balance_calls"] == 1 + 3  # the plan, then three checkpoints (the last finds nothing left)
    assert not done.moves() and done.epoch == grown.epoch + found["planned"]


def test_the_ring_reference_and_the_move_cost():
    owners = sim.ring_owners(SHARDS, sim.names(8))
    assert len(owners) == SHARDS and set(owners) <= set(sim.names(8))
    r = sim.ring(SHARDS, 8)
    assert r["min"] <= SHARDS / 8 <= r["max"] and 0 < r["join_moves"] < SHARDS
    cost = sim.move_cost(1000)
    assert cost["seconds_per_move"] == pytest.approx(1000 / cost["memories_per_second"], abs=0.01)
    assert 1000 < cost["moved_bytes_per_memory"] < cost["disk_bytes_per_memory"] < 20_000


def test_the_reports_are_written(tmp_path):
    res = sim.main(["--nodes", "3,4", "--shards", "32", "--ring-nodes", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["nodes"] == 3
    assert len(res["rows"]) == 4
    text = (tmp_path / "results.md").read_text()
    assert "each plan held as carried out: yes" in text and "not uhashring" in text


def test_the_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the `loadtest` extra (make loadtest-install)")
    res = sim.run([3, 4], 32, [1, 2], 15.0, 1000, [4], set())
    assert sim.plot(res, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 10_000


class _Flip:
    """A stand-in whose plan never empties and whose copies go back and forth between two states."""

    def __init__(self, state: int) -> None:
        self.replicas = (("a", "b"),) if state else (("b", "a"),)
        self.state = state

    def handovers(self) -> list:
        return [(0, "x", "y")]


def test_asking_again_after_each_change_stops_at_a_cycle():
    done, found = sim.carry_out(_Flip(0), "handovers", lambda p, _: _Flip(1 - p.state), budget_s=60.0)
    assert found["mode"] == "driver" and found["cycle_after"] == 2 and not found["plan_held"]
    assert found["carried_out"] == 2 and done.state == 0
