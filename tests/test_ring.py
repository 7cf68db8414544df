"""Ids, the stable entity hash, and a placement's changes one copy at a time (balance: test_placement_balance.py)."""

import subprocess
import sys

from node.ids import entity_token, new_memory_id, parse_memory_id, stable_hash
from node.control.placement import Placement


def test_memory_id_grammar():
    assert parse_memory_id("user:sarah::session-1::4") == ("user:sarah", "session-1", 4)
    assert parse_memory_id("a::b::c::sdk::ff") == ("a::b::c", "sdk", None)  # sdk ids carry no turn
    assert parse_memory_id("plain-id") == (None, "", None)
    assert parse_memory_id("ent::x") == (None, "", None)  # not the grammar: a free-form id
    assert parse_memory_id("ent::s::٣") == ("ent", "s", None)  # only ASCII digits make a turn
    mid = new_memory_id("user:bob")
    assert mid.startswith("user:bob::sdk::") and parse_memory_id(mid).session_id == "sdk"


def test_stable_hash_is_the_same_in_another_process():
    here = stable_hash("user:sarah")
    code = "from node.ids import stable_hash; print(stable_hash('user:sarah'))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=str(__import__("conftest").ROOT))
    assert int(there.stdout) == here


def test_entity_token_is_one_fts_token():
    tok = entity_token("user:sarah ✓")
    assert tok.isalnum() and tok != entity_token("user:sarah")


def test_a_placement_changes_one_shard_at_a_time_at_a_new_epoch():
    p = Placement(16, ("node-0", "node-1"))
    grown = p.with_nodes(("node-0", "node-1", "node-2"))
    assert grown.owner == p.owner and grown.epoch == p.epoch + 1  # members first, shards after
    moves = grown.moves()
    assert moves and all(to == "node-2" for _, _, to in moves)
    shard, _, to = moves[0]
    moved = grown.with_owner(shard, to)
    assert moved.node_of_shard(shard) == "node-2" and moved.epoch == grown.epoch + 1
    assert len(moved.moves()) == len(moves) - 1
    assert Placement.from_json(moved.to_json()) == moved
    shrunk = moved.with_nodes(("node-0", "node-2"))
    assert all(frm == "node-1" or to != "node-1" for _, frm, to in shrunk.moves())
    assert {frm for _, frm, _ in shrunk.moves()} >= {"node-1"}


def test_replicas_sit_on_distinct_nodes_and_a_moved_primary_hands_over():
    p = Placement(32, ("a", "b", "c"), replication=2)
    assert all(len(set(r)) == 2 for r in p.replicas)
    assert sorted(s for n in "abc" for s in p.shards_of(n)) == sorted(list(range(32)) * 2)
    assert sorted(s for n in "abc" for s in p.by_node().get(n, [])) == list(range(32))  # requests: primaries
    shard = 0
    primary, follower = p.replicas[shard]
    moved = p.with_copy_moved(shard, primary, "d")
    assert moved.replicas[shard] == (follower, "d") and moved.owner[shard] == follower
    promoted = p.with_primary(shard, follower)
    assert promoted.replicas[shard] == (follower, primary) and promoted.epoch == p.epoch + 1
    grown = Placement(32, ("a", "b", "c"), replication=3, replicas=p.replicas)
    assert {(frm, to is not None) for _, frm, to in grown.moves()} == {(None, True)}  # a third copy each
    assert Placement.from_json(moved.to_json()) == moved
    old = {"shards": 2, "nodes": ["a"], "epoch": 4, "owner": ["a", "a"]}  # a placement.json before replicas
    assert Placement.from_json(old).replicas == (("a",), ("a",))
