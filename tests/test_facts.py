"""Fact supersession: slots, validity chains, and ranking of current versus former values."""

from __future__ import annotations

import pytest

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
