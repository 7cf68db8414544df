"""A query is embedded once, whatever the number of nodes, and a repeated query text not at all.

A query without `entity_id` is answered by every node; each used to embed its text again (the
nodes' model passes grew by one per node per query). Now it is embedded once and the vector goes to
all: by the router itself once it has loaded the nodes' export (router.query_embedder), by one node
until then or where it has none (router.cluster.Cluster.embed_once); whichever embeds keeps the
vector (node.embedder.EmbeddingCache).
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from tests.conftest import API_KEY, http_json


def model_passes(base: str) -> tuple[int, dict[str, int]]:
    """The model passes of every node and of the router so far, and their embedding-cache counts summed."""
    status, body = http_json(base, "/stats")
    assert status == 200, body
    embedders = [*body["nodes"].values(), body["router"]["embedding"]]
    cache = {k: sum(n["embedding_cache"][k] for n in embedders) for k in ("hits", "misses")}
    return sum(n["embedder_passes"] for n in embedders), cache


def router_embeds(base: str) -> bool:
    status, body = http_json(base, "/stats")
    return body["router"]["embedding"]["embeds"]


@pytest.mark.parametrize("nodes", [1, 3])
def test_a_query_costs_one_embedding_whatever_the_node_count(make_server, nodes):
    server = make_server(TELLODB_NODES=str(nodes), TELLODB_SHARDS="24").start()  # 24: every node holds shards
    base = server.base_url
    status, body = http_json(base, "/ingest/batch", {"items": [
        {"entity_id": f"user-{i}", "textual_content": f"user {i} keeps a red bicycle in the garage"} for i in range(12)]})
    assert status in (200, 201), body
    status, stats = http_json(base, "/stats")
    assert len(stats["nodes"]) == nodes and all(n["shards_owned"] for n in stats["nodes"].values()), stats["nodes"]

    # The router loads the nodes' export at its first query that spans nodes (one node embeds that
    # one), on a thread; with one node the node embeds every query.
    for i in range(100):
        before, cache_before = model_passes(base)
        status, hits = http_json(base, "/query/semantic", {"textual_query": f"who keeps bicycle number {i}?", "limit": 20})
        assert status == 200 and len(hits) == 12, hits  # every node answered
        after, cache_after = model_passes(base)
        assert after - before == 1, f"a query over {nodes} nodes made {after - before} model passes"
        assert cache_after["misses"] - cache_before["misses"] == 1
        if nodes == 1 or router_embeds(base):
            break
        time.sleep(0.1)
    assert router_embeds(base) == (nodes > 1), http_json(base, "/stats")[1]["router"]
    before = model_passes(base)[0]
    status, hits = http_json(base, "/query/semantic", {"textual_query": "who keeps a bicycle?", "limit": 20})
    assert status == 200 and len(hits) == 12, hits
    after = model_passes(base)[0]
    assert after - before == 1, f"a query over {nodes} nodes made {after - before} model passes"

    status, hits = http_json(base, "/query/semantic", {"textual_query": "where is the bicycle?", "entity_id": "user-3"})
    assert status == 200 and [h["entity_id"] for h in hits] == ["user-3"], hits
    assert model_passes(base)[0] - after == 1

    # The same texts again: no model pass at all, and the cache says so.
    settled, cache_settled = model_passes(base)
    for body in ({"textual_query": "who keeps a bicycle?", "limit": 20},
                 {"textual_query": "where is the bicycle?", "entity_id": "user-3"}):
        status, hits = http_json(base, "/query/semantic", body)
        assert status == 200 and hits, hits
    again, cache_again = model_passes(base)
    assert again == settled, "a repeated query text was embedded again"
    assert cache_again["hits"] - cache_settled["hits"] == 2 and cache_again["misses"] == cache_settled["misses"]

    # ...and Prometheus sees the cache's hits and misses and the passes, per node and the router's.
    req = urllib.request.Request(base + "/metrics", headers={"x-api-key": API_KEY})
    text = urllib.request.urlopen(req, timeout=30).read().decode()
    hits = re.findall(r'^tellodb_node_embedding_cache\{node="node-\d+",result="hit"\} (\S+)$', text, re.M)
    router_hits = re.findall(r'^tellodb_router_embedding_cache\{result="hit"\} (\S+)$', text, re.M)
    assert len(hits) == nodes and sum(float(v) for v in hits + router_hits) == cache_again["hits"]
    assert float(router_hits[0]) == (1 if nodes > 1 else 0)  # the repeated query that spans nodes
    passes = re.findall(r'^tellodb_node_embedding_passes\{node="node-\d+"\} (\S+)$', text, re.M)
    router_passes = re.findall(r'^tellodb_router_embedding_passes (\S+)$', text, re.M)
    assert sum(float(v) for v in passes + router_passes) == again
    assert (float(router_passes[0]) > 0) == (nodes > 1)
