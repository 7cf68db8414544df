"""Fact supersession: slots, validity chains, and ranking of current versus former values."""

from __future__ import annotations

import pytest

from conftest import API_KEY
from node.facts import asks_about_the_past, inferred_predicates, slots_of
from test_api import ingest_batch, post, uid

DAY = 86_400_000
T0 = 1_700_000_000_000


@pytest.mark.parametrize("text, predicates", [
    ("I live in Austin", ["lives_in"]),
    ("I moved to Seattle last month", ["lives_in"]),
    ("User works at Acme Corp as a software engineer", ["works_at"]),
    ("I just joined Initech", ["works_at"]),
    ("I work as a nurse", ["job_title"]),
    ("My wife is Ana", ["relationship"]),
    ("My name is Sam", ["name"]),
    ("I'm 34 years old", ["age"]),
    ("We went to the beach", []),
    ("She lives in Paris", []),  # third person: not the entity's own fact
])
def test_inferred_predicates(text, predicates):
    assert inferred_predicates(text) == predicates


def test_slots_from_keys_relations_and_text():
    assert slots_of("Sarah", "I live in Austin", (("Sarah", "lives_in", "Austin"), ("Sarah", "likes", "tea")),
                    None) == ["sarah|lives_in"]
    assert slots_of("e", "anything", (), "favourite_colour") == ["favourite_colour"]
    assert slots_of("e", "I like tea", (("e", "likes", "tea"),), None) == []
    assert slots_of("conv", "Caroline: I moved to Sweden", (), None) == ["caroline|lives_in"]


@pytest.mark.parametrize("question, past", [
    ("Where does Sarah live now?", False), ("Where did Sarah live before?", True),
    ("Where did she use to live", True), ("What was her previous job?", False), ("previously, where?", True),
    ("Where does she work?", False),
])
def test_questions_about_the_past(question, past):
    assert asks_about_the_past(question) is past


async def supersede(api, e: str, with_relations: bool) -> None:
    rel = (lambda city: [["lives_in", city]]) if with_relations else (lambda city: None)
    await ingest_batch(api, [
        {"entity_id": e, "textual_content": "I live in Austin", "relations": rel("Austin"),
         "memory_id": f"{e}::s1::0", "timestamp": T0},
        {"entity_id": e, "textual_content": "I love tacos and live music", "memory_id": f"{e}::s1::1",
         "timestamp": T0 + 1},
    ])
    await ingest_batch(api, [{"entity_id": e, "textual_content": "I moved to Seattle", "relations": rel("Seattle"),
                              "memory_id": f"{e}::s2::0", "timestamp": T0 + 30 * DAY}])


@pytest.mark.parametrize("with_relations", [False, True])
async def test_now_and_before(api, with_relations):
    e = uid("facts")
    await supersede(api, e, with_relations)
    _, now = await post(api, "/query/semantic", {"textual_query": f"where does {e} live now", "entity_id": e})
    assert now[0]["textual_content"] == "I moved to Seattle"
    _, before = await post(api, "/query/semantic", {"textual_query": f"where did {e} live before", "entity_id": e})
    assert before[0]["textual_content"] == "I live in Austin"
    _, then = await post(api, "/query/semantic", {"textual_query": f"where does {e} live", "entity_id": e,
                                                  "point_in_time_ms": T0 + 10 * DAY})
    assert then[0]["textual_content"] == "I live in Austin"  # as of that instant, Austin was current
    assert all(h["created_at_ms"] <= T0 + 10 * DAY for h in then)
    assert len(now) == 3  # stale facts stay in storage and in results, only lower


async def test_a_late_older_fact_is_stored_as_already_stale(api):
    e = uid("facts")
    await ingest_batch(api, [{"entity_id": e, "textual_content": "I work at Globex", "timestamp": T0 + 10 * DAY}])
    await ingest_batch(api, [{"entity_id": e, "textual_content": "I work at Initech", "timestamp": T0}])
    _, now = await post(api, "/query/semantic", {"textual_query": "where do I work", "entity_id": e})
    assert now[0]["textual_content"] == "I work at Globex"
    _, before = await post(api, "/query/semantic", {"textual_query": "where did I work previously", "entity_id": e})
    assert before[0]["textual_content"] == "I work at Initech"


async def test_explicit_fact_keys_and_deletes_reopen_the_chain(api):
    e = uid("facts")
    await ingest_batch(api, [
        {"entity_id": e, "textual_content": "Favourite colour: green", "fact_key": "colour", "timestamp": T0,
         "memory_id": f"{e}::c::0"},
        {"entity_id": e, "textual_content": "Favourite colour: blue", "fact_key": "colour", "timestamp": T0 + DAY,
         "memory_id": f"{e}::c::1"},
    ])
    _, hits = await post(api, "/query/semantic", {"textual_query": "favourite colour green", "entity_id": e})
    assert hits[0]["textual_content"] == "Favourite colour: blue"
    await post(api, "/memory/delete", {"memory_id": f"{e}::c::1"})
    _, hits = await post(api, "/query/semantic", {"textual_query": "favourite colour", "entity_id": e})
    assert hits[0]["textual_content"] == "Favourite colour: green"


async def test_superseded_facts_mark_their_edges_invalid(api):
    e = uid("facts")
    await supersede(api, e, with_relations=True)
    _, out = await post(api, "/graph/query", {"subject": e, "edge_type": "lives_in", "user_id": e})
    assert {(x["target"], x["valid"]) for x in out["edges"]} == {("Austin", False), ("Seattle", True)}


async def test_semantic_dedup_stores_a_near_duplicate_once(api):
    e = uid("dedup")
    status, first = await post(api, "/ingest", {"entity_id": e, "textual_content": "I am allergic to peanuts",
                                                "memory_id": f"{e}::s::0", "enable_semantic_dedup": True})
    assert status == 201 and first["deduplicated"] is False and first["duplicate_of"] is None
    status, again = await post(api, "/ingest", {"entity_id": e, "textual_content": "I am allergic to peanuts!",
                                                "memory_id": f"{e}::s::1", "enable_semantic_dedup": True})
    assert again["deduplicated"] is True and again["duplicate_of"] == f"{e}::s::0"
    status, other = await post(api, "/ingest", {"entity_id": e, "textual_content": "My sister lives in Lisbon",
                                                "enable_semantic_dedup": True})
    assert other["deduplicated"] is False
    # Without the flag, the same text is stored again; another entity is never a duplicate.
    _, plain = await post(api, "/ingest", {"entity_id": e, "textual_content": "I am allergic to peanuts"})
    _, elsewhere = await post(api, "/ingest", {"entity_id": uid("dedup"), "textual_content": "I am allergic to peanuts",
                                               "enable_semantic_dedup": True})
    assert plain["deduplicated"] is False and elsewhere["deduplicated"] is False
    _, batch = await post(api, "/ingest/batch", {"items": [
        {"entity_id": e, "textual_content": "Flight to Oslo on 3 May", "enable_semantic_dedup": True,
         "memory_id": f"{e}::t::0"},
        {"entity_id": e, "textual_content": "Flight to Oslo on 3 May.", "enable_semantic_dedup": True,
         "memory_id": f"{e}::t::1"}]})
    assert batch["ingested"] == 1 and batch["duplicates"] == {f"{e}::t::1": f"{e}::t::0"}
    _, hits = await post(api, "/query/semantic", {"textual_query": "peanuts", "entity_id": e, "limit": 50})
    assert sorted(h["memory_id"] for h in hits if "peanuts" in h["textual_content"])[0] == f"{e}::s::0"
    assert sum("peanuts" in h["textual_content"] for h in hits) == 2  # the original and the unflagged copy


async def test_stats_count_facts_edges_and_measurements(api):
    e = uid("stats")
    await supersede(api, e, with_relations=True)
    await ingest_batch(api, [{"entity_id": e, "textual_content": "Paid $12 for lunch"}])
    r = await api.get("/stats", headers={"x-api-key": API_KEY})
    stats = await r.json()
    assert r.status == 200 and stats["nodes_up"] == 2
    for key in ("memories", "entities", "facts_current", "facts_stale", "edges", "edges_valid", "measurements"):
        assert stats[key] == sum(n[key] for n in stats["nodes"].values()), key
    assert stats["facts_stale"] >= 1 and stats["edges"] > stats["edges_valid"] and stats["measurements"] >= 1
    node = next(n for n in stats["nodes"].values() if n["per_shard"])
    assert sum(s["memories"] for s in node["per_shard"].values()) == node["memories"]


async def test_profile_shows_current_facts_and_recent_activity(api):
    e = uid("profile")
    await supersede(api, e, with_relations=False)
    await ingest_batch(api, [{"entity_id": e, "textual_content": "Paid $12 for lunch", "timestamp": T0 + 40 * DAY}])
    key = {"x-api-key": API_KEY}
    r = await api.get("/profile", params={"entity_id": e, "recent": "2"}, headers=key)
    p = await r.json()
    assert r.status == 200 and p["entity_id"] == e and p["memories"] == 4
    assert [(f["slot"], f["textual_content"]) for f in p["current_facts"]] == [(f"{e}|lives_in", "I moved to Seattle")]
    assert [m["textual_content"] for m in p["recent"]] == ["Paid $12 for lunch", "I moved to Seattle"]
    assert p["measurements"] == {"money_usd": 1} and p["first_seen_ms"] == T0
    r = await api.get("/profile", params={"entity_id": uid("nobody")}, headers=key)
    assert r.status == 404
    r = await api.get("/profile", headers=key)
    totals = await r.json()
    assert r.status == 200 and totals["entity_id"] is None and totals["memories"] >= 4


def test_question_cues_grow_linearly_with_the_question():
    """A cue with a gap (`did ... live`, `where ... work`) must not rescan the question from every word.
    CPU time of this process (`process_time`), not wall time: other work on a busy machine does not count."""
    import time

    from node.facts import asked_predicates, asks_about_the_past

    def seconds(q: str) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            asked_predicates(q)
            asks_about_the_past(q)
            best = min(best, time.process_time() - started)
        return best

    for word in ("did ", "where "):
        small, large = seconds(word * (2500 // len(word))), seconds(word * (10000 // len(word)))
        assert large / max(small, 1e-3) < 10, (word, small, large)  # quadratic: about 16
