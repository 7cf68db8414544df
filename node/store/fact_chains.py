"""Fact chains: each fact slot's values in time order, and what that order does to ranking.

A memory may state facts (node/facts.py): values of slots such as `user|lives_in`. The facts of
a slot form a chain: each is valid until the next one's timestamp, the newest has no end, and a
relation restating a superseded fact is marked invalid. Writes drop and re-chain the slots they
touch in their own transaction; searches rank current facts above superseded ones.
"""

from __future__ import annotations

import sqlite3

from node.ranking import Candidate
from node.store.schema import rows_in


def drop_facts(db: sqlite3.Connection, memory_id: str) -> set[tuple[str, str]]:
    """Delete a memory's facts; return their (entity, slot) pairs, whose chains must be redone."""
    rows = db.execute("SELECT entity_id, slot FROM facts WHERE memory_id = ?", (memory_id,)).fetchall()
    db.execute("DELETE FROM facts WHERE memory_id = ?", (memory_id,))
    return {(r[0], r[1]) for r in rows}


def rechain(db: sqlite3.Connection, slots: set[tuple[str, str]]) -> None:
    """Each fact of a slot is valid until the next one's timestamp; the newest has no end.
    Relations restating a superseded fact are marked invalid. In a transaction."""
    memories: set[str] = set()
    for entity_id, slot in slots:
        chain = db.execute(
            "SELECT rowid, memory_id, valid_from_ms FROM facts WHERE entity_id = ? AND slot = ? "
            "ORDER BY valid_from_ms, rowid", (entity_id, slot)).fetchall()
        for i, (rowid, memory_id, _) in enumerate(chain):
            valid_to = chain[i + 1][2] if i + 1 < len(chain) else None
            db.execute("UPDATE facts SET valid_to_ms = ? WHERE rowid = ?", (valid_to, rowid))
            memories.add(memory_id)
    for memory_id in memories:
        db.execute(
            "UPDATE relations SET valid = NOT EXISTS (SELECT 1 FROM facts f WHERE f.memory_id = relations.memory_id"
            " AND f.slot = lower(relations.subject) || '|' || lower(relations.predicate)"
            " AND f.valid_to_ms IS NOT NULL) WHERE memory_id = ?", (memory_id,))


def apply_validity(db: sqlite3.Connection, scored: list[Candidate], as_of: int | None, past: bool, asked: set[str],
                   stale_factor: float) -> None:
    """Adjust the candidates' scores, in place, by the validity `as_of` of the facts they state."""
    by_id = {c.memory_id: c for c in scored}
    facts: dict[str, list[tuple[str, int, int | None]]] = {}
    ids = list(by_id)
    for memory_id, slot, valid_from, valid_to in rows_in(
            db, "SELECT memory_id, slot, valid_from_ms, valid_to_ms FROM facts WHERE memory_id IN ({marks})", ids):
        facts.setdefault(memory_id, []).append((slot, valid_from, valid_to))
    if not facts:
        return

    def stale(memory_id: str) -> bool:
        return all(to is not None and (as_of is None or to <= as_of) for _, _, to in facts[memory_id])

    slots: dict[str, list[str]] = {}
    for memory_id, fs in facts.items():
        if stale(memory_id) != past:  # present: stale ones lose; past: current ones lose
            by_id[memory_id].score *= stale_factor
        for slot, _, _ in fs:
            slots.setdefault(slot, []).append(memory_id)
    top = max(c.score for c in scored)
    for slot, members in slots.items():
        current = [m for m in members if not stale(m)]
        former = [m for m in members if stale(m)]
        pool = (former or current) if past else current
        if not pool:
            continue
        # The preferred fact: the current one, or for the past the latest former value.
        preferred = max(pool, key=lambda m: by_id[m].created_at_ms)
        if slot.rsplit("|", 1)[-1] in asked:
            rival = top  # the question asks for exactly this: it answers first
        elif len(members) > 1:
            rival = max(by_id[m].score for m in members if m != preferred)
        else:
            continue
        if by_id[preferred].score <= rival:
            by_id[preferred].score = rival + 1e-6
