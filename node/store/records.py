"""A memory as the store takes it (`MemoryRecord`) and gives it back (a dict), and the plain reads of rows."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np

MEMORY_COLUMNS = (
    "memory_id, entity_id, session_id, turn_index, created_at_ms, ingested_at_ms, kind, textual_content, relations"
)


@dataclass(frozen=True)
class MemoryRecord:
    """A validated memory with its embedding, ready to store."""

    memory_id: str
    entity_id: str
    session_id: str
    turn_index: int | None  # None: not a turn of a session (no window neighbours)
    created_at_ms: int
    kind: str | None
    textual_content: str
    relations: tuple[tuple[str, str, str], ...]  # (subject, predicate, object)
    vector: np.ndarray
    metrics: tuple[tuple[str, float], ...] = ()  # explicit (label, value) pairs from the ingest
    fact_key: str | None = None  # explicit fact slot (see node/facts.py)
    ingested_at_ms: int | None = None  # None: now; a replayed change keeps its original time


def row_to_memory(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "memory_id": row["memory_id"],
        "entity_id": row["entity_id"],
        "session_id": row["session_id"],
        "turn_index": row["turn_index"] if row["turn_index"] is not None else 0,
        "created_at_ms": row["created_at_ms"],
        "ingested_at_ms": row["ingested_at_ms"],
        "kind": row["kind"],
        "textual_content": row["textual_content"],
        "relations": json.loads(row["relations"]),
    }


def get(db: sqlite3.Connection, memory_id: str) -> dict[str, Any] | None:
    row = db.execute(f"SELECT {MEMORY_COLUMNS} FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
    return row_to_memory(row) if row else None


def turn_window(db: sqlite3.Connection, memory_id: str, radius: int) -> list[dict[str, Any]]:
    """The memory and the turns of its session within `radius` of it, in turn order."""
    me = db.execute(f"SELECT {MEMORY_COLUMNS} FROM memories WHERE memory_id = ?", (memory_id,)).fetchone()
    if me is None:
        return []
    if me["turn_index"] is None:
        return [row_to_memory(me)]
    rows = db.execute(
        f"SELECT {MEMORY_COLUMNS} FROM memories WHERE entity_id = ? AND session_id = ? "
        "AND turn_index BETWEEN ? AND ? ORDER BY turn_index, created_at_ms",
        (me["entity_id"], me["session_id"], me["turn_index"] - radius, me["turn_index"] + radius),
    ).fetchall()
    return [row_to_memory(r) for r in rows]


def entity_count(db: sqlite3.Connection, entity_id: str | None) -> int:
    if entity_id is None:
        return db.execute("SELECT COUNT(*) FROM memories").fetchone()[0]
    row = db.execute("SELECT memories FROM entities WHERE entity_id = ?", (entity_id,)).fetchone()
    return row[0] if row else 0


def profile(db: sqlite3.Connection, entity_id: str, recent: int) -> dict[str, Any]:
    """What the engine holds true about an entity now, and what it heard from it last."""
    facts = db.execute(
        "SELECT f.slot, f.valid_from_ms, m.memory_id, m.textual_content FROM facts f "
        "JOIN memories m ON m.memory_id = f.memory_id WHERE f.entity_id = ? AND f.valid_to_ms IS NULL "
        "ORDER BY f.slot", (entity_id,)).fetchall()
    span = db.execute("SELECT COUNT(*), MIN(created_at_ms), MAX(created_at_ms) FROM memories "
                           "WHERE entity_id = ?", (entity_id,)).fetchone()
    latest = db.execute(f"SELECT {MEMORY_COLUMNS} FROM memories WHERE entity_id = ? "
                             "ORDER BY created_at_ms DESC, rowid DESC LIMIT ?", (entity_id, recent)).fetchall()
    labels = db.execute("SELECT label, COUNT(*) FROM measurements WHERE entity_id = ? GROUP BY label "
                             "ORDER BY label", (entity_id,)).fetchall()
    return {
        "memories": span[0], "first_seen_ms": span[1], "last_seen_ms": span[2],
        "current_facts": [{"slot": f[0], "valid_from_ms": f[1], "memory_id": f[2], "textual_content": f[3]}
                          for f in facts],
        "recent": [row_to_memory(r) for r in latest],
        "measurements": {label: n for label, n in labels},
        "edges": db.execute("SELECT COUNT(*) FROM relations WHERE entity_id = ?", (entity_id,)).fetchone()[0],
    }
