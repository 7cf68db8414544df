"""Deterministic numeric memory: extraction rules, and exact aggregates through the API."""

from __future__ import annotations

import statistics

import pytest

from node.measurements import Measurement, extract
from test_api import assert_error, ingest_batch, post, uid

DAY = 86_400_000
T0 = 1_700_006_400_000  # 2023-11-15T00:00:00Z, a Wednesday


@pytest.mark.parametrize("text, expected", [
    ("Paid $12.50 for lunch", [("money_usd", 12.5, "USD")]),
    ("It cost 1,200 USD and then €30", [("money_usd", 1200.0, "USD"), ("money_eur", 30.0, "EUR")]),
    ("Ran 5 km then walked 3 miles", [("distance_km", 5.0, "km"), ("distance_km", 4.828032, "mi")]),
    ("Swam 400 m", [("distance_km", 0.4, "m")]),
    ("Meditated 45 minutes, slept 7.5 hours", [("duration_min", 45.0, "min"), ("duration_min", 450.0, "h")]),
    ("I weigh 70 kg; the bag is 150 lbs", [("weight_kg", 70.0, "kg"), ("weight_kg", 68.0388555, "lb")]),
    ("Battery at 15%", [("percent", 15.0, "%")]),
    ("Drank 3 cups of coffee and did 10 push-ups", [("count_cups", 3.0, "count"), ("count_push-ups", 10.0, "count")]),
    ("Nothing measurable here, 3 years ago", []),
])
def test_extraction_rules(text, expected):
    got = [(m.label, round(m.value, 7), m.unit) for m in extract(text)]
    assert got == [(label, round(value, 7), unit) for label, value, unit in expected]


def test_extraction_values_are_measurements():
    assert extract("$5") == [Measurement("money_usd", 5.0, "USD")]


async def test_sums_match_hand_computed_values(api):
    e = uid("numbers")
    spend = [12.5, 7.25, 30.0, 4.75, 100.0]
    items = [{"entity_id": e, "textual_content": f"Spent ${v} on groceries", "timestamp": T0 + i * DAY}
             for i, v in enumerate(spend)]
    items.append({"entity_id": e, "textual_content": "Weekly check-in", "timestamp": T0,
                  "metrics": {"mood": 7, "sleep_hours": 6.5}})
    items.append({"entity_id": e, "textual_content": "Weekly check-in again", "timestamp": T0 + 8 * DAY,
                  "metrics": {"mood": 9}})
    await ingest_batch(api, items)
    status, out = await post(api, "/analytics/query", {"entity_id": e, "label": "money_usd"})
    assert status == 200
    assert (out["entity_id"], out["label"], out["count"]) == (e, "money_usd", 5)
    assert out["sum"] == pytest.approx(sum(spend))
    assert out["avg"] == pytest.approx(statistics.mean(spend))
    assert (out["min"], out["max"]) == (4.75, 100.0)
    assert out["stddev"] == pytest.approx(statistics.pstdev(spend))
    _, window = await post(api, "/analytics/query", {"entity_id": e, "label": "money_usd",
                                                     "start_timestamp_ms": T0 + DAY, "end_timestamp_ms": T0 + 3 * DAY})
    assert window["count"] == 3 and window["sum"] == pytest.approx(7.25 + 30.0 + 4.75)
    _, mood = await post(api, "/analytics/query", {"entity_id": e, "label": "mood", "bucket": "week"})
    assert (mood["count"], mood["sum"], mood["avg"]) == (2, 16.0, 8.0)
    assert [(b["bucket"], b["count"], b["sum"]) for b in mood["buckets"]] == [("2023-11-13", 1, 7.0),
                                                                              ("2023-11-20", 1, 9.0)]
    _, daily = await post(api, "/analytics/query", {"entity_id": e, "label": "money_usd", "bucket": "day"})
    assert [b["bucket"] for b in daily["buckets"]] == ["2023-11-15", "2023-11-16", "2023-11-17", "2023-11-18",
                                                       "2023-11-19"]
    _, none = await post(api, "/analytics/query", {"entity_id": e, "label": "unknown_label", "bucket": "month"})
    assert none == {"entity_id": e, "label": "unknown_label", "count": 0, "sum": 0.0, "avg": None, "min": None,
                    "max": None, "stddev": None, "buckets": []}


async def test_deleting_or_replacing_a_memory_updates_its_measurements(api):
    e = uid("numbers")
    await ingest_batch(api, [{"entity_id": e, "textual_content": "Paid $10", "memory_id": f"{e}::s::0"},
                             {"entity_id": e, "textual_content": "Paid $20", "memory_id": f"{e}::s::1"}])
    await ingest_batch(api, [{"entity_id": e, "textual_content": "Paid $25 actually", "memory_id": f"{e}::s::1"}])
    _, out = await post(api, "/analytics/query", {"entity_id": e, "label": "money_usd"})
    assert (out["count"], out["sum"]) == (2, 35.0)
    await post(api, "/memory/delete", {"memory_id": f"{e}::s::0"})
    _, out = await post(api, "/analytics/query", {"entity_id": e, "label": "money_usd"})
    assert (out["count"], out["sum"]) == (1, 25.0)
    status, erased = await post(api, "/entity/erase", {"entity_id": e})
    assert erased["measurements"] == 1
    _, out = await post(api, "/analytics/query", {"entity_id": e, "label": "money_usd"})
    assert out["count"] == 0


async def test_analytics_validation(api):
    for body in ({"label": "x"}, {"entity_id": "e"}, {"entity_id": "e", "label": "x", "bucket": "year"},
                 {"entity_id": "e", "label": "x", "start_timestamp_ms": 5, "end_timestamp_ms": 4}):
        status, out = await post(api, "/analytics/query", body)
        assert_error(status, out, 422, "validation_error")
    for metrics in ({"x": "7"}, {"x": True}, {"x": float("nan")}):
        status, out = await post(api, "/ingest", {"entity_id": "e", "textual_content": "t", "metrics": metrics})
        assert status in (400, 422) and "error" in out
