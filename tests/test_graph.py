"""The knowledge graph: relations from ingest become edges; /graph/query, /graph/walk, /graph/export."""

from __future__ import annotations

from test_api import assert_error, ingest_batch, post, uid

T0 = 1_700_000_000_000


async def seed(api, entity: str) -> None:
    triples = [("alice", "knows", "bob"), ("bob", "works_at", "acme"), ("bob", "likes", "jazz"),
               ("acme", "located_in", "austin"), ("carol", "knows", "bob"), ("alice", "knows", "dave")]
    await ingest_batch(api, [{"entity_id": entity, "textual_content": f"{s} {p} {o}", "relations": [[s, p, o]],
                              "memory_id": f"{entity}::g::{i}", "timestamp": T0 + i} for i, (s, p, o) in
                             enumerate(triples)])
    await ingest_batch(api, [{"entity_id": entity, "textual_content": "I live in Austin",
                              "relations": [["lives_in", "Austin"]], "timestamp": T0 + 10}])


def node_ids(result: dict) -> set[str]:
    return {n["id"] for n in result["nodes"]}


async def test_graph_query_directions_and_types(api):
    e = uid("graph")
    await seed(api, e)
    status, out = await post(api, "/graph/query", {"subject": "bob", "user_id": e})
    assert status == 200
    assert {(x["edge_type"], x["target"]) for x in out["edges"]} == {("works_at", "acme"), ("likes", "jazz")}
    assert out["count"] == 2 and all(x["source"] == "bob" and x["valid"] for x in out["edges"])
    assert {"source", "target", "edge_type", "memory_id", "timestamp_ms", "valid"} <= set(out["edges"][0])
    status, into = await post(api, "/graph/query", {"subject": "bob", "direction": "in", "user_id": e})
    assert {x["source"] for x in into["edges"]} == {"alice", "carol"}
    status, both = await post(api, "/graph/query", {"subject": "bob", "direction": "both", "edge_type": "knows",
                                                    "user_id": e})
    assert {(x["source"], x["target"]) for x in both["edges"]} == {("alice", "bob"), ("carol", "bob")}
    status, limited = await post(api, "/graph/query", {"subject": "bob", "direction": "both", "limit": 1,
                                                       "user_id": e})
    assert limited["count"] == 1
    status, pair = await post(api, "/graph/query", {"subject": e, "user_id": e})
    assert [(x["edge_type"], x["target"]) for x in pair["edges"]] == [("lives_in", "Austin")]  # pair: subject = entity


async def test_two_hop_walk_follows_edge_types_depth_and_breadth(api):
    e = uid("graph")
    await seed(api, e)
    status, walk = await post(api, "/graph/walk", {"node": "alice", "edge_types": ["knows", "works_at"],
                                                   "depth": 2, "user_id": e})
    assert status == 200
    assert node_ids(walk) == {"alice", "bob", "dave", "acme"}  # not jazz (likes), not austin (3 hops)
    assert {n["id"]: n["depth"] for n in walk["nodes"]} == {"alice": 0, "bob": 1, "dave": 1, "acme": 2}
    assert {(x["source"], x["target"], x["depth"]) for x in walk["edges"]} == {
        ("alice", "bob", 1), ("alice", "dave", 1), ("bob", "acme", 2)}
    _, one = await post(api, "/graph/walk", {"node": "alice", "depth": 1, "user_id": e})
    assert node_ids(one) == {"alice", "bob", "dave"}
    _, three = await post(api, "/graph/walk", {"node": "alice", "depth": 3, "user_id": e})
    assert node_ids(three) == {"alice", "bob", "dave", "acme", "jazz", "austin"}
    _, narrow = await post(api, "/graph/walk", {"node": "alice", "depth": 1, "breadth": 1, "user_id": e})
    assert len(narrow["edges"]) == 1
    _, capped = await post(api, "/graph/walk", {"node": "alice", "depth": 3, "limit": 2, "user_id": e})
    assert len(capped["edges"]) == 2
    _, back = await post(api, "/graph/walk", {"node": "austin", "direction": "in", "depth": 3, "user_id": e})
    assert node_ids(back) == {"austin", "acme", "bob", "alice", "carol"}


async def test_a_walk_within_an_entity_is_one_node_call(api, monkeypatch):
    """The entity's shard holds every edge of the walk: its node walks all hops (node.graph_walk)."""
    from router.node_client import NodeClient

    e = uid("graph")
    await seed(api, e)
    calls, call = [], NodeClient._call

    async def counted(self, method, *args):
        calls.append(method)
        return await call(self, method, *args)

    monkeypatch.setattr(NodeClient, "_call", counted)
    _, walk = await post(api, "/graph/walk", {"node": "alice", "depth": 3, "user_id": e})
    assert node_ids(walk) == {"alice", "bob", "dave", "acme", "jazz", "austin"}
    assert calls == ["walk"]


async def test_walk_without_user_fans_out(api):
    a, b = uid("graph"), uid("graph")
    node = f"hub-{a}"
    await ingest_batch(api, [{"entity_id": a, "textual_content": "x", "relations": [[node, "links", "left"]]}])
    await ingest_batch(api, [{"entity_id": b, "textual_content": "y", "relations": [[node, "links", "right"]]}])
    _, walk = await post(api, "/graph/walk", {"node": node, "depth": 1})
    assert node_ids(walk) == {node, "left", "right"}
    assert {x["entity_id"] for x in walk["edges"]} == {a, b}


async def test_export_is_ready_for_a_visualiser(api):
    e = uid("graph")
    await seed(api, e)
    status, g = await post(api, "/graph/export", {"seed": "bob", "depth": 1, "user_id": e})
    assert status == 200
    assert node_ids(g) == {"bob", "acme", "jazz", "alice", "carol"}
    ids = node_ids(g)
    assert all(x["source"] in ids and x["target"] in ids and x["label"] for x in g["edges"])
    assert len({x["id"] for x in g["edges"]}) == len(g["edges"])
    _, small = await post(api, "/graph/export", {"seed": "bob", "depth": 2, "max_nodes": 3, "user_id": e})
    assert len(small["nodes"]) == 3


async def test_deleting_a_memory_removes_its_edges(api):
    e = uid("graph")
    await seed(api, e)
    status, body = await post(api, "/memory/delete", {"memory_id": f"{e}::g::1"})  # bob works_at acme
    assert body["deleted"] is True
    _, out = await post(api, "/graph/query", {"subject": "bob", "user_id": e})
    assert {x["target"] for x in out["edges"]} == {"jazz"}


async def test_graph_validation(api):
    for path, body in [("/graph/query", {}), ("/graph/query", {"subject": "x", "direction": "up"}),
                       ("/graph/walk", {"node": "x", "depth": 0}), ("/graph/walk", {"node": "x", "depth": 99}),
                       ("/graph/walk", {"node": "x", "edge_types": "knows"}), ("/graph/export", {"seed": ""}),
                       ("/graph/export", {"seed": "x", "max_nodes": 0})]:
        status, out = await post(api, path, body)
        assert_error(status, out, 422, "validation_error")
