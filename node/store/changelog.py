"""Every shard's change log: what changed, in order, so a copy of the shard can be brought up to date.

Each logical change (an upsert of a memory, a delete, the erase of an entity, a free-form id's home
record set, dropped, or forgotten with its erased entity) is one row of `changes`, written in the same SQLite transaction as the change,
with a sequence number that only grows. Derived state (FTS entries, lexical windows, fact chains,
edges, measurements, entity counts) is not logged: applying a change recomputes it the way the
original write did, so replaying the log after sequence S onto a snapshot taken at S yields the same
logical state. `apply` skips changes at or below the copy's own last sequence number, so replaying
twice, or from an earlier point, changes nothing.

The log is bounded: `trim` keeps the newest `keep` changes of a shard, and never those after the
lowest pin (`pin`): a snapshot being copied or a follower still reading holds a pin at its sequence
number. An erase also removes the entity's own earlier changes from the log, so no copy of its text
survives there.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, NamedTuple

import numpy as np

from node.store.records import MemoryRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    key TEXT NOT NULL,
    entity_id TEXT,
    body TEXT,
    vector BLOB
);
CREATE INDEX IF NOT EXISTS changes_by_entity ON changes(entity_id);
CREATE TABLE IF NOT EXISTS log_pins (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log_trimmed (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
"""

UPSERT, DELETE, ERASE, HOME, UNHOME = "upsert", "delete", "erase", "home", "unhome"
FORGET = "forget"  # an erased entity's free-form id: its home record and log entries go (node.id_homes)


class Change(NamedTuple):
    seq: int
    op: str
    key: str  # memory id (upsert, delete, home, unhome, forget) or entity id (erase)
    entity_id: str | None
    body: str | None  # JSON: an upsert's fields, a home's shard
    vector: bytes | None


def record(db: sqlite3.Connection, op: str, key: str, entity_id: str | None = None, body: Any = None,
           vector: bytes | None = None, seq: int | None = None) -> None:
    """Append a change (inside the caller's transaction); `seq` only when applying another copy's."""
    db.execute("INSERT INTO changes(seq, op, key, entity_id, body, vector) VALUES (?, ?, ?, ?, ?, ?)",
               (seq, op, key, entity_id, None if body is None else json.dumps(body, ensure_ascii=False), vector))


def upsert_body(record_: MemoryRecord, ingested_at_ms: int) -> dict[str, Any]:
    """What replaying an upsert needs besides the vector (the record and its ingest time)."""
    return {"entity_id": record_.entity_id, "session_id": record_.session_id, "turn_index": record_.turn_index,
            "created_at_ms": record_.created_at_ms, "ingested_at_ms": ingested_at_ms, "kind": record_.kind,
            "textual_content": record_.textual_content, "relations": [list(r) for r in record_.relations],
            "metrics": [list(m) for m in record_.metrics], "fact_key": record_.fact_key}


def last_seq(db: sqlite3.Connection) -> int:
    """The sequence number of the newest change (0 for none); survives trimming (sqlite_sequence)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return int(row[0]) if row else 0


def since(db: sqlite3.Connection, after: int, limit: int = 1000) -> list[Change]:
    """Changes with a sequence number above `after`, oldest first, at most `limit`."""
    return [Change(*r) for r in db.execute(
        "SELECT seq, op, key, entity_id, body, vector FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))]


def change_at(db: sqlite3.Connection, seq: int) -> Change | None:
    """The change numbered `seq`, if the log still has it."""
    row = db.execute("SELECT seq, op, key, entity_id, body, vector FROM changes WHERE seq = ?", (seq,)).fetchone()
    return Change(*row) if row else None


def digest(change: Change) -> str:
    """sha256 of a change row: two copies whose changes at one seq have the same digest hold the
    same change there (a follower that diverged, an ex-primary's writes never replicated, does not)."""
    h = hashlib.sha256(json.dumps([change.seq, change.op, change.key, change.entity_id, change.body],
                                  ensure_ascii=False).encode())
    h.update(change.vector or b"")
    return h.hexdigest()


def advance(db: sqlite3.Connection, seq: int) -> None:
    """Make `last_seq` at least `seq` (inside the caller's transaction): a copy brought up to another
    copy's `seq`, whose newest changes may have left the log (an erase), numbers its own after it."""
    if seq > last_seq(db):
        if not db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'changes'", (seq,)).rowcount:
            db.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('changes', ?)", (seq,))


def trimmed_to(db: sqlite3.Connection) -> int:
    """The newest sequence number `trim` has dropped (0: never trimmed). A copy at S can be brought
    up to date from this log only if S >= this; an erase's gaps in the log do not count."""
    row = db.execute("SELECT seq FROM log_trimmed WHERE id = 1").fetchone()
    return int(row[0]) if row else 0


def first_seq(db: sqlite3.Connection) -> int:
    """The oldest change still in the log (last_seq + 1 when it is empty): replay needs a copy at or after it - 1."""
    row = db.execute("SELECT MIN(seq) FROM changes").fetchone()
    return int(row[0]) if row[0] is not None else last_seq(db) + 1


def forget_entity(db: sqlite3.Connection, entity_id: str) -> None:
    """Drop an erased entity's earlier changes (inside the erase's transaction)."""
    db.execute("DELETE FROM changes WHERE entity_id = ?", (entity_id,))


def pin(db: sqlite3.Connection, name: str, seq: int | None) -> None:
    """Keep changes after `seq` for reader `name` (None: release the pin)."""
    if seq is None:
        db.execute("DELETE FROM log_pins WHERE name = ?", (name,))
    else:
        db.execute("INSERT OR REPLACE INTO log_pins(name, seq) VALUES (?, ?)", (name, seq))


def trim(db: sqlite3.Connection, keep: int) -> int:
    """Drop changes older than the newest `keep` and the lowest pin; return how many."""
    floor = last_seq(db) - keep
    pinned = db.execute("SELECT MIN(seq) FROM log_pins").fetchone()[0]
    if pinned is not None:
        floor = min(floor, int(pinned))
    if floor <= trimmed_to(db):
        return 0
    db.execute("INSERT OR REPLACE INTO log_trimmed(id, seq) VALUES (1, ?)", (floor,))
    return db.execute("DELETE FROM changes WHERE seq <= ?", (floor,)).rowcount


def vector_of(change: Change) -> np.ndarray:
    return np.frombuffer(change.vector, dtype=np.float32)


def record_of(change: Change) -> MemoryRecord:
    """The record an upsert change wrote (the inverse of `upsert_body`)."""
    b = json.loads(change.body)
    return MemoryRecord(
        memory_id=change.key, entity_id=b["entity_id"], session_id=b["session_id"],
        turn_index=b["turn_index"], created_at_ms=b["created_at_ms"], kind=b["kind"],
        textual_content=b["textual_content"], relations=tuple(tuple(r) for r in b["relations"]),
        vector=vector_of(change), metrics=tuple((m[0], m[1]) for m in b["metrics"]),
        fact_key=b["fact_key"], ingested_at_ms=b["ingested_at_ms"])
