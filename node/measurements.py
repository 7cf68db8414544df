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

Bounded work: the text is scanned once for number tokens (a regex that never backtracks across a
digit run), and each token is tried against the rules in order with anchored matches at its ends,
so extraction is linear in the text. A token longer than MAX_NUMBER_CHARS characters is not a
number, and at most MAX_MEASUREMENTS measurements are taken per text (the first ones).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

MAX_NUMBER_CHARS = 32  # a longer digit run (with separators) is an identifier, not a quantity
MAX_MEASUREMENTS = 128  # per text; the first ones in order of appearance

# One left-to-right pass: finditer resumes after each token, so a digit run is consumed once.
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?")


class Measurement(NamedTuple):
    label: str
    value: float
    unit: str | None


class _Rule(NamedTuple):
    prefix: str | None  # currency symbol before the number (`$5`, `$ 5`), or None for a unit after it
    suffix: re.Pattern | None  # matched at the number's end: the unit, with its own look-arounds
    label: str
    unit: str
    factor: float


# In order of precedence: the first rule that fits a number claims it.
_RULES: list[_Rule] = []


def _after(pattern: str, label: str, unit: str, factor: float = 1.0) -> None:
    _RULES.append(_Rule(None, re.compile(pattern, re.IGNORECASE), label, unit, factor))


def _before(symbol: str, label: str, unit: str, not_followed_by: str | None = None) -> None:
    guard = re.compile(not_followed_by) if not_followed_by else None
    _RULES.append(_Rule(symbol, guard, label, unit, 1.0))


_before("$", "money_usd", "USD", not_followed_by=r"[\d,.]*\s*%")  # `$5%` is not money
_after(r"\s?(?:usd|us dollars?|dollars?|bucks)\b", "money_usd", "USD")
_before("€", "money_eur", "EUR")
_after(r"\s?(?:eur|euros?)\b", "money_eur", "EUR")
_before("£", "money_gbp", "GBP")
_after(r"\s?(?:gbp|pounds sterling|quid)\b", "money_gbp", "GBP")
_after(r"\s?(?:km|kilometers?|kilometres?)\b", "distance_km", "km")
_after(r"\s?(?:mi|miles?)\b", "distance_km", "mi", 1.609344)
_after(r"\s?(?:m|meters?|metres?)\b(?!\s*(?:ago|later))", "distance_km", "m", 0.001)
_after(r"\s?(?:min|mins|minutes?)\b", "duration_min", "min")
_after(r"\s?(?:h|hrs?|hours?)\b", "duration_min", "h", 60.0)
_after(r"\s?(?:s|secs?|seconds?)\b", "duration_min", "s", 1 / 60)
_after(r"\s?(?:days?)\b", "duration_min", "d", 1440.0)
_after(r"\s?(?:kg|kgs|kilograms?|kilos?)\b", "weight_kg", "kg")
_after(r"\s?(?:lb|lbs|pounds?)\b(?!\s+sterling)", "weight_kg", "lb", 0.45359237)
_after(r"\s?(?:g|grams?)\b", "weight_kg", "g", 0.001)
_after(r"\s?(?:%|percent\b|per cent\b)", "percent", "%")

UNIT_WORDS = frozenset("""usd dollar dollars bucks eur euro euros gbp pounds quid km kilometer kilometers kilometre
kilometres mi mile miles m meter meters metre metres min mins minute minutes h hr hrs hour hours s sec secs second
seconds day days kg kgs kilogram kilograms kilo kilos lb lbs pound g gram grams percent years year weeks week months
month times am pm""".split())
COUNT_NOUN = re.compile(r"\s+(?P<noun>[a-z][a-z-]{2,30}s)\b", re.IGNORECASE)  # after a whole number of 1-6 digits
_NOT_BEFORE_COUNT = frozenset(".,$€£")

_DIGIT = re.compile(r"\d")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _unit_match(text: str, start: int, end: int, value: float) -> tuple[int, int, Measurement] | None:
    """The first rule that fits the number text[start:end]: (span start, span end, measurement)."""
    for rule in _RULES:
        if rule.prefix is not None:
            at = start - 1
            if at >= 1 and text[at].isspace():
                at -= 1
            if at < 0 or text[at] != rule.prefix or (rule.suffix is not None and rule.suffix.match(text, end)):
                continue
            span = (at, end)
        else:
            m = rule.suffix.match(text, end)
            if m is None:
                continue
            span = (start, m.end())
        scaled = value * rule.factor
        if math.isfinite(scaled):
            return span[0], span[1], Measurement(rule.label, round(scaled, 9), rule.unit)
    return None


def _count_match(text: str, start: int, end: int) -> tuple[int, int, Measurement] | None:
    """`3 cups`: a whole number of at most six digits that starts a word, before a plural noun."""
    number = text[start:end]
    if len(number) > 6 or not number.isdigit():
        return None
    if start > 0:
        prev = text[start - 1]
        if prev in _NOT_BEFORE_COUNT or prev.isalnum() or prev == "_":
            return None
    m = COUNT_NOUN.match(text, end)
    if m is None:
        return None
    noun = m.group("noun").lower()
    if noun in UNIT_WORDS:
        return None
    return start, m.end(), Measurement(f"count_{noun}", float(number), "count")


def extract(text: str) -> list[Measurement]:
    """Every measurement in `text`, in order of appearance (at most MAX_MEASUREMENTS); each span is
    used at most once. Linear in len(text)."""
    if not _DIGIT.search(text):  # every rule needs a digit; most chat turns have none
        return []
    found: list[Measurement] = []
    taken_until = 0  # spans are claimed left to right, so one bound replaces an overlap list
    for token in NUMBER.finditer(text):
        start, end = token.span()
        if end - start > MAX_NUMBER_CHARS:
            continue
        value = _number(token.group())
        match = _unit_match(text, start, end, value) or _count_match(text, start, end)
        if match is None or match[0] < taken_until:
            continue
        taken_until = match[1]
        found.append(match[2])
        if len(found) >= MAX_MEASUREMENTS:
            break
    return found
