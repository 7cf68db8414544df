"""Deterministic numeric memory: numbers with units found in text, normalised to canonical labels.

Extraction rules (applied to every memory's text; explicit `metrics: {label: value}` in an ingest
are stored as given, with no unit):

| label            | matches (case-insensitive)                                  | stored value      |
|------------------|-------------------------------------------------------------|-------------------|
| `money_usd`      | `$12.50`, `12.50 USD`, `12 dollars`                         | amount            |
| `money_eur`      | `€30`, `30 EUR`, `30 euros`                                 | amount            |
| `money_gbp`      | `£8`, `8 GBP`, `8 pounds sterling`                          | amount            |
| `distance_km`    | `5 km`, `5 kilometers`, `3.1 miles`/`mi`, `400 m`/`meters`  | kilometres        |
| `duration_min`   | `45 min`/`minutes`, `2 h`/`hours`/`hrs`, `30 s`/`seconds`, `3 days` | minutes   |
| `weight_kg`      | `70 kg`, `150 lb`/`lbs`/`pounds`, `200 g`/`grams`           | kilograms         |
| `percent`        | `15%`, `15 percent`                                         | percent           |
| `count_<noun>`   | a whole number before a plural noun: `3 cups`, `10 push-ups` | the number       |

Numbers may carry thousands separators (`1,200`) and decimals (`3.5`). Words that are units
above never become counts; `count_` nouns are lower-cased as written (`count_cups`).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

NUMBER = r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"


class Measurement(NamedTuple):
    label: str
    value: float
    unit: str | None


# (compiled pattern, label, unit shown, factor to the canonical unit)
_UNIT_RULES: list[tuple[re.Pattern, str, str, float]] = []


def _rule(pattern: str, label: str, unit: str, factor: float = 1.0) -> None:
    _UNIT_RULES.append((re.compile(pattern, re.IGNORECASE), label, unit, factor))


_rule(r"\$\s?" + NUMBER + r"(?![\d,.]*\s*%)", "money_usd", "USD")
_rule(NUMBER + r"\s?(?:usd|us dollars?|dollars?|bucks)\b", "money_usd", "USD")
_rule(r"€\s?" + NUMBER, "money_eur", "EUR")
_rule(NUMBER + r"\s?(?:eur|euros?)\b", "money_eur", "EUR")
_rule(r"£\s?" + NUMBER, "money_gbp", "GBP")
_rule(NUMBER + r"\s?(?:gbp|pounds sterling|quid)\b", "money_gbp", "GBP")
_rule(NUMBER + r"\s?(?:km|kilometers?|kilometres?)\b", "distance_km", "km")
_rule(NUMBER + r"\s?(?:mi|miles?)\b", "distance_km", "mi", 1.609344)
_rule(NUMBER + r"\s?(?:m|meters?|metres?)\b(?!\s*(?:ago|later))", "distance_km", "m", 0.001)
_rule(NUMBER + r"\s?(?:min|mins|minutes?)\b", "duration_min", "min")
_rule(NUMBER + r"\s?(?:h|hrs?|hours?)\b", "duration_min", "h", 60.0)
_rule(NUMBER + r"\s?(?:s|secs?|seconds?)\b", "duration_min", "s", 1 / 60)
_rule(NUMBER + r"\s?(?:days?)\b", "duration_min", "d", 1440.0)
_rule(NUMBER + r"\s?(?:kg|kgs|kilograms?|kilos?)\b", "weight_kg", "kg")
_rule(NUMBER + r"\s?(?:lb|lbs|pounds?)\b(?!\s+sterling)", "weight_kg", "lb", 0.45359237)
_rule(NUMBER + r"\s?(?:g|grams?)\b", "weight_kg", "g", 0.001)
_rule(NUMBER + r"\s?(?:%|percent\b|per cent\b)", "percent", "%")

UNIT_WORDS = frozenset("""usd dollar dollars bucks eur euro euros gbp pounds quid km kilometer kilometers kilometre
kilometres mi mile miles m meter meters metre metres min mins minute minutes h hr hrs hour hours s sec secs second
seconds day days kg kgs kilogram kilograms kilo kilos lb lbs pound g gram grams percent years year weeks week months
month times am pm""".split())
COUNT = re.compile(r"(?<![\d.,$€£])\b(?P<num>\d{1,6})\s+(?P<noun>[a-z][a-z-]{2,30}s)\b", re.IGNORECASE)


_DIGIT = re.compile(r"\d")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def extract(text: str) -> list[Measurement]:
    """Every measurement in `text`, in order of appearance; each span is used at most once."""
    if not _DIGIT.search(text):  # every rule needs a digit; most chat turns have none
        return []
    found: list[tuple[int, Measurement]] = []
    taken: list[tuple[int, int]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= a or start >= b for a, b in taken)

    for pattern, label, unit, factor in _UNIT_RULES:
        for m in pattern.finditer(text):
            if free(m.start(), m.end()):
                value = _number(m.group("num")) * factor
                if math.isfinite(value):
                    taken.append((m.start(), m.end()))
                    found.append((m.start(), Measurement(label, round(value, 9), unit)))
    for m in COUNT.finditer(text):
        noun = m.group("noun").lower()
        if noun in UNIT_WORDS or not free(m.start(), m.end()):
            continue
        taken.append((m.start(), m.end()))
        found.append((m.start(), Measurement(f"count_{noun}", float(m.group("num")), "count")))
    return [meas for _, meas in sorted(found, key=lambda x: x[0])]
