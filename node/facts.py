"""Fact slots: which memories state a value that a newer statement replaces.

A slot names one thing that holds one value at a time, for one entity: `<subject>|<predicate>`.
A memory states a fact for a slot when
  1. its ingest carries an explicit `fact_key` (the slot is the key as given), or
  2. one of its relation triples has a single-valued predicate (`SINGLE_VALUED`, configurable in
     `ranking_config.json` as `single_valued_predicates`): slot `<subject>|<predicate>`, or
  3. its text says so in one of the common first-person forms below (`I live in ...`, `I moved to
     ...`, `User works at ...`, `my name is ...`): slot `<entity>|<predicate>`, or for a transcript
     line `Speaker: text` the speaker's slot `<speaker>|<predicate>` (two people in one
     conversation do not supersede each other).

| predicate      | text forms (case-insensitive; subject "I", "user" or "the user")                       |
|----------------|-----------------------------------------------------------------------------------------|
| `lives_in`     | live(s)/am living/reside(s) in X; moved/relocated to X; am based in X; my home is in X    |
| `works_at`     | work(s)/am working at/for X; joined X; started (a new job / working) at X; employed by X |
| `job_title`    | work(s) as (a/an) X; my job/title/role is X                                             |
| `relationship` | am/is married to, engaged to, dating, in a relationship with X; my wife/husband/partner/ |
|                | girlfriend/boyfriend/spouse is X                                                          |
| `name`         | my name is X; call me X                                                                   |
| `age`          | I am / I'm N years old; my age is N                                                       |

In each slot the memories are ordered by timestamp: each is valid from its own timestamp until the
next one's, the newest has no end. A fact that arrives late is therefore stored already stale.

A question that asks for one of these predicates (cues below) is answered by the slot's fact first:
its current value, or for a question about the past (`PAST`) its latest former value.

| predicate      | question cues                                                     |
|----------------|-------------------------------------------------------------------|
| `lives_in`     | live, lives, living, reside, home, based, move(d), city, address  |
| `works_at`     | work(s/ing) at/for, employer, company, job at, employed           |
| `job_title`    | job title, role, position, profession, do for a living, work as  |
| `relationship` | married, wife, husband, partner, spouse, dating, girlfriend, boyfriend |
| `name`         | name, called                                                       |
| `age`          | how old, age                                                       |
"""

from __future__ import annotations

import re

SINGLE_VALUED = ("lives_in", "works_at", "job_title", "age", "married_to", "relationship", "name",
                 "employer", "title", "home_city")

_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("lives_in", re.compile(
        r"\b(?:i|user|the user)\s+(?:now\s+|currently\s+|still\s+)?(?:live|lives|am living|is living|reside|resides)"
        r"\s+in\b|\b(?:i|user|the user)\s+(?:just\s+|recently\s+|have\s+|has\s+)?(?:moved|relocated)\s+to\b"
        r"|\b(?:i'm|i am|user is|the user is)\s+(?:now\s+)?based\s+in\b|\bmy home is in\b", re.I)),
    ("works_at", re.compile(
        r"\b(?:i|user|the user)\s+(?:now\s+|currently\s+|still\s+)?(?:work|works|am working|is working)\s+(?:at|for)\b"
        r"|\b(?:i|user|the user)\s+(?:just\s+|recently\s+|have\s+|has\s+)?(?:joined|started (?:a new job |working )?at)\b"
        r"|\b(?:i'm|i am|user is|the user is)\s+(?:now\s+)?employed\s+(?:by|at)\b", re.I)),
    ("job_title", re.compile(
        r"\b(?:i|user|the user)\s+(?:now\s+)?(?:work|works|am working|is working)\s+as\b"
        r"|\bmy (?:job|title|role|position) is\b", re.I)),
    ("relationship", re.compile(
        r"\b(?:i'm|i am|user is|the user is)\s+(?:now\s+)?(?:married to|engaged to|dating|in a relationship with)\b"
        r"|\bmy (?:wife|husband|partner|girlfriend|boyfriend|spouse|fianc[eé]e?) is\b", re.I)),
    ("name", re.compile(r"\bmy name is\b|\bcall me\b", re.I)),
    ("age", re.compile(r"\b(?:i'm|i am|user is|the user is)\s+\d{1,3}\s+years?\s+old\b|\bmy age is\b", re.I)),
]

_CUES: list[tuple[str, re.Pattern]] = [
    ("lives_in", re.compile(r"\b(?:live|lives|living|lived|reside|resides|home|based|move|moved|city|address)\b", re.I)),
    ("works_at", re.compile(r"\b(?:work|works|working|worked)\s+(?:at|for)\b|\b(?:employer|company|employed)\b"
                            r"|\bwhere\b[^?]{0,200}\bwork", re.I)),
    ("job_title", re.compile(r"\b(?:job title|role|position|profession|do for a living|work as)\b", re.I)),
    ("relationship", re.compile(r"\b(?:married|wife|husband|partner|spouse|dating|girlfriend|boyfriend)\b", re.I)),
    ("name", re.compile(r"\b(?:name|called)\b", re.I)),
    ("age", re.compile(r"\bhow old\b|\bage\b", re.I)),
]

# Words that mark a question about the past: stale facts then rank first.
PAST = re.compile(
    r"\b(?:used to|before|previously|formerly|former|earlier|in the past|originally|at first|back then|"
    r"prior|old (?:address|job|home|city|employer)|no longer|anymore|any more|did\b[^?]{0,200}\b(?:live|work)|"
    r"where did|what did)\b", re.I)


SPEAKER = re.compile(r"^\s*([A-Z][\w .'-]{0,40}?):\s")  # "Caroline: ..." in a transcript


def inferred_predicates(text: str) -> list[str]:
    """Single-valued predicates the text states in a first-person form (see the table above)."""
    return [predicate for predicate, pattern in _PATTERNS if pattern.search(text)]


def slots_of(entity_id: str, text: str, relations: tuple[tuple[str, str, str], ...], fact_key: str | None,
             single_valued: tuple[str, ...] = SINGLE_VALUED) -> list[str]:
    """Every slot a memory states a fact for, without repeats."""
    slots: list[str] = []
    if fact_key:
        slots.append(fact_key)
    for subject, predicate, _ in relations:
        if predicate.lower() in single_valued:
            slots.append(f"{subject.lower()}|{predicate.lower()}")
    speaker = SPEAKER.match(text)
    subject = speaker.group(1) if speaker else entity_id
    for predicate in inferred_predicates(text[speaker.end():] if speaker else text):
        slots.append(f"{subject.lower()}|{predicate}")
    return list(dict.fromkeys(slots))


def asked_predicates(query: str) -> set[str]:
    """The single-valued predicates a question asks about (see the cue table above)."""
    return {predicate for predicate, pattern in _CUES if pattern.search(query)}


def asks_about_the_past(query: str) -> bool:
    return PAST.search(query) is not None
