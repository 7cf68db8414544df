"""Stage-timing headers (router/timing.py): the upstream engine's `x-tm-<stage>-ms/-us` and a standard
`Server-Timing`, on every query and ingest answer, through the HTTP API on the real session cluster."""

from __future__ import annotations

import re
import uuid

import pytest

from conftest import API_KEY
from router.timing import INGEST_STAGES, QUERY_STAGES, Timing

AUTH = {"x-api-key": API_KEY}
# W3C Server Timing: comma-separated metrics, each a token name and `;param=value` pairs
METRIC = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+)((?:\s*;\s*[A-Za-z]+=[^;,]+)*)$")


def server_timing(value: str) -> dict[str, float]:
    """name -> dur (ms) of a Server-Timing header; fails on anything that does not parse."""
    out = {}
    for entry in value.split(","):
        m = METRIC.match(entry.strip())
        assert m, (entry, value)
        params = dict(p.strip().split("=", 1) for p in m.group(2).split(";") if p.strip())
        out[m.group(1)] = float(params["dur"])
    return out


def assert_timings(headers, stages: tuple[str, ...]) -> dict[str, int]:
    """Every stage's pair and the total's: whole numbers, ms the truncated us; returns stage -> us."""
    us = {}
    for stage in (*stages, "total"):
        ms_value, us_value = headers.get(f"x-tm-{stage}-ms"), headers.get(f"x-tm-{stage}-us")
        assert ms_value is not None and us_value is not None, (stage, dict(headers))
        assert ms_value.isdigit() and us_value.isdigit(), (stage, ms_value, us_value)
        assert int(ms_value) == int(us_value) // 1000, (stage, ms_value, us_value)
        us[stage] = int(us_value)
    assert us["total"] > 0 and us["cluster"] > 0 and us["cluster"] <= us["total"], us
    timing = server_timing(headers["Server-Timing"])
    assert set(timing) == {*stages, "total"}, timing
    assert all(abs(timing[s] * 1000 - us[s]) <= 1 for s in timing), (timing, us)
    return us


async def test_query_answers_carry_every_stage_header(api):
    ent = f"timing-{uuid.uuid4().hex[:12]}"
    resp = await api.post("/ingest", json={"entity_id": ent, "textual_content": "the red kite nests by the river"},
                          headers=AUTH)
    assert resp.status == 201
    assert_timings(resp.headers, INGEST_STAGES)
    assert "x-tm-rerank-applied" not in resp.headers
    resp = await api.post("/ingest/batch", json={"items": [{"entity_id": ent, "textual_content": "a second kite"}]},
                          headers=AUTH)
    assert resp.status == 201
    assert_timings(resp.headers, INGEST_STAGES)

    for rerank in (False, True, None):
        for path in ("/query/semantic", "/query"):
            body = {"textual_query": "where does the kite nest", "entity_id": ent, "limit": 5}
            if rerank is not None:
                body["enable_neural_rerank"] = rerank
            resp = await api.post(path, json=body, headers=AUTH)
            assert resp.status == 200 and (await resp.json())[0]["entity_id"] == ent
            assert_timings(resp.headers, QUERY_STAGES)
            assert resp.headers["x-tm-rerank-applied"] == "0"  # no cross-encoder here: never applied
            assert resp.headers["x-tm-rerank-us"] == "0"
    # The nodes' own stages, of an entity's query and of one every node answers (node.records.Hits).
    for body in ({"textual_query": f"kite nest {uuid.uuid4().hex}", "entity_id": ent},
                 {"textual_query": f"kite nest {uuid.uuid4().hex}"}):
        resp = await api.post("/query/semantic", json=body, headers=AUTH)
        assert resp.status == 200 and await resp.json()
        us = assert_timings(resp.headers, QUERY_STAGES)
        assert all(us[stage] > 0 for stage in ("embed", "ann", "fts", "fuse", "hydrate", "storage")), (body, us)
        assert us["cluster"] >= us["ann"] + us["fuse"], us
    resp = await api.get("/temporal/query", params={"entity_id": ent, "textual_query": "kite"}, headers=AUTH)
    assert resp.status == 200 and len(await resp.json()) == 2
    assert_timings(resp.headers, QUERY_STAGES)
    assert resp.headers["x-tm-rerank-applied"] == "0"


async def test_the_openapi_document_names_the_headers(api):
    spec = await (await api.get("/openapi.json")).json()
    for path, method, status, stages in (("/query/semantic", "post", "200", QUERY_STAGES),
                                         ("/temporal/query", "get", "200", QUERY_STAGES),
                                         ("/ingest", "post", "201", INGEST_STAGES)):
        headers = spec["paths"][path][method]["responses"][status]["headers"]
        assert {f"x-tm-{s}-{u}" for s in (*stages, "total") for u in ("ms", "us")} <= set(headers), path
        assert "Server-Timing" in headers


@pytest.mark.parametrize("reported", [
    {"embed": 0.0012, "ann": 0.000_25, "fts": 0.0031, "fuse": 0.000_01, "hydrate": 0.0004, "storage": 0.002},
])
def test_a_nodes_stage_dict_goes_in_with_one_call(reported):
    """What the query path hands over once nodes report their stages: every stage lands in its headers."""
    timing = Timing(QUERY_STAGES)
    timing.add(reported)
    timing.add({"ann": 0.000_25})  # a second call adds to the first
    headers = timing.headers(0.05)
    assert headers["x-tm-embed-us"] == "1200" and headers["x-tm-embed-ms"] == "1"
    assert headers["x-tm-ann-us"] == "500" and headers["x-tm-fts-ms"] == "3"
    assert headers["x-tm-storage-us"] == "2000" and headers["x-tm-total-ms"] == "50"
    assert headers["x-tm-cluster-us"] == "0"  # nothing measured it: present, and 0
    assert server_timing(headers["Server-Timing"])["embed"] == pytest.approx(1.2)
