"""The right to be forgotten: an entity's memories exported page by page, and erased without a trace.

An erase deletes the entity's rows (pages are zeroed: `secure_delete`), merges both FTS indexes so
no segment keeps its tokens, truncates the WAL, drops its earlier change-log entries, and has the
Chroma index rebuilt from SQLite (HNSW files keep deleted vectors otherwise), so no file of the
shard holds a copy.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import node.store.changelog as changelog
from node.store.records import MEMORY_COLUMNS, row_to_memory
from node.store.schema import LEXICAL_SOURCES


def export_page(db: sqlite3.Connection, entity_id: str, after_rowid: int, limit: int) -> list[dict[str, Any]]:
    """One page of an entity's memories, with their relations and measurements, in storage order."""
    rows = db.execute(
        f"SELECT rowid, {MEMORY_COLUMNS} FROM memories WHERE entity_id = ? AND rowid > ? ORDER BY rowid LIMIT ?",
        (entity_id, after_rowid, limit)).fetchall()
    page = []
    for r in rows:
        measured = db.execute(
            "SELECT label, value, unit, timestamp_ms FROM measurements WHERE memory_id = ? ORDER BY rowid",
            (r["memory_id"],)).fetchall()
        page.append(dict(row_to_memory(r), rowid=r["rowid"],
                         measurements=[{"label": m[0], "value": m[1], "unit": m[2], "timestamp_ms": m[3]}
                                       for m in measured]))
    return page


def erase_rows(db: sqlite3.Connection, entity_id: str, seq: int | None = None) -> dict[str, int]:
    """Delete an entity's rows and its earlier change-log entries, and log the erase; in a transaction."""
    memories = db.execute("SELECT COUNT(*) FROM memories WHERE entity_id = ?", (entity_id,)).fetchone()[0]
    relations = db.execute("DELETE FROM relations WHERE entity_id = ?", (entity_id,)).rowcount
    measurements = db.execute("DELETE FROM measurements WHERE entity_id = ?", (entity_id,)).rowcount
    db.execute("DELETE FROM facts WHERE entity_id = ?", (entity_id,))
    if memories:
        # Neighbours of the entity's own turns are its own: no other entity's window changes.
        db.execute("DELETE FROM memories WHERE entity_id = ?", (entity_id,))
    db.execute("DELETE FROM entities WHERE entity_id = ?", (entity_id,))
    counts = {"memories": memories, "relations": relations, "measurements": measurements}
    if any(counts.values()) or seq is not None:
        changelog.forget_entity(db, entity_id)
        changelog.record(db, changelog.ERASE, entity_id, seq=seq)  # no entity: a later erase keeps it
    return counts


def scrub(db: sqlite3.Connection) -> None:
    """After an erase: merge the FTS indexes and truncate the WAL (the caller rebuilds the Chroma
    index), so no file of the shard keeps a copy of what was erased."""
    for table, _ in LEXICAL_SOURCES:
        db.execute(f"INSERT INTO {table}({table}) VALUES ('optimize')")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
