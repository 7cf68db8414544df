"""Number extraction is linear in the text and capped: no input shape makes it backtrack."""

from __future__ import annotations

import time

import pytest

from node.measurements import MAX_MEASUREMENTS, MAX_NUMBER_CHARS, Measurement, extract

# Shapes that were quadratic before (a digit run retried from every digit; overlaps checked pairwise).
PATHOLOGICAL = {
    "digits": "7",
    "km": "1 km ",
    "separators": "1,000",
    "decimals": "1.5.",
    "counts": "3 cups ",
    "dollar-percent": "$1,",
}


def _seconds(text: str) -> float:
    """Best of three runs: a shared machine only ever slows a run down."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        extract(text)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", sorted(PATHOLOGICAL))
def test_extraction_grows_linearly(shape):
    unit = PATHOLOGICAL[shape]
    n = 20_000 // len(unit)
    small, large = _seconds(unit * n), _seconds(unit * 4 * n)
    # Linear: 4x the text costs about 4x; quadratic would cost 16x. Floor the small time at 1 ms so
    # timer noise on a fast run cannot make the ratio meaningless.
    assert large / max(small, 1e-3) < 10, (shape, small, large)


def test_the_reported_inputs_finish_far_inside_the_old_times():
    # Before: 8,000 digits took 34 s, 16,000 about 2 minutes, "1 km " * 10000 3.6 s.
    started = time.perf_counter()
    assert extract("7" * 16_000) == []
    assert len(extract("1 km " * 10_000)) == MAX_MEASUREMENTS
    extract("7" * 1_000_000)
    assert time.perf_counter() - started < 2.0


def test_caps():
    assert extract("9" * (MAX_NUMBER_CHARS + 1) + " km") == []
    assert extract("9" * MAX_NUMBER_CHARS + " km") == [Measurement("distance_km", float("9" * MAX_NUMBER_CHARS), "km")]
    found = extract(" ".join(f"{i} km" for i in range(1, 1000)))
    assert [m.value for m in found] == [float(i) for i in range(1, MAX_MEASUREMENTS + 1)]  # the first ones, in order


@pytest.mark.parametrize("text, expected", [
    ("$5 km", [("money_usd", 5.0, "USD")]),  # the first rule claims the number
    ("€5 USD", [("money_usd", 5.0, "USD")]),
    ("$5% off", [("percent", 5.0, "%")]),
    ("$ 12 and £ 3", [("money_gbp", 3.0, "GBP"), ("money_usd", 12.0, "USD")]),
    ("400 m ago", []),
    ("8 pounds sterling, 3 lbs", [("money_gbp", 8.0, "GBP"), ("weight_kg", 1.3607771, "lb")]),
    ("a3 cups, 2.5 cups, 1234567 cups, 4 days", [("duration_min", 5760.0, "d")]),
    ("1,20 USD", [("money_usd", 20.0, "USD")]),
    ("1,2345 h", [("duration_min", 140700.0, "h")]),  # a malformed group: the digits after the comma
])
def test_precedence_and_boundaries(text, expected):
    got = sorted((m.label, round(m.value, 7), m.unit) for m in extract(text))
    assert got == sorted(expected)
