"""One half of a shard: a snapshot of it with the other half's rows taken out (node.splits).

A split copies a shard twice, then keeps in each copy the entities (and the free-form id homes) the
new placement gives that half. The file is not served yet, so this works on a connection of its
own, in one transaction; the triggers take each deleted memory's FTS entries, window and
measurements with it. The copy's change log is emptied and marked trimmed at its sequence number:
its changes were the whole shard's, and a follower of the old shard must be copied again, never
brought up to date from them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

import node.store.changelog as changelog
from node.store.erasure import scrub
from node.store.schema import write_meta
from node.store.transaction import Transaction

ENTITY_TABLES = ("relations", "measurements", "facts", "memories", "entities")  # memories' triggers go first
CHUNK = 500  # ids per DELETE (SQLite's bound on parameters)


def keep_half(path: str | Path, shard_id: int, keeps_entity: Callable[[str], bool],
              keeps_id: Callable[[str], bool]) -> dict[str, int]:
    """Delete from the shard file at `path` the entities `keeps_entity` refuses and the id homes
    `keeps_id` refuses, stamp it as `shard_id`; how many entities and memories it keeps."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        with Transaction(db):
            entities = {e for table in ENTITY_TABLES for (e,) in db.execute(f"SELECT DISTINCT entity_id FROM {table}")}
            gone = sorted(e for e in entities if not keeps_entity(e))
            for table in ENTITY_TABLES:
                _delete_in(db, table, "entity_id", gone)
            homes = [m for (m,) in db.execute("SELECT memory_id FROM id_homes") if not keeps_id(m)]
            _delete_in(db, "id_homes", "memory_id", homes)
            seq = changelog.last_seq(db)
            db.execute("DELETE FROM changes")
            db.execute("DELETE FROM log_pins")
            db.execute("INSERT OR REPLACE INTO log_trimmed(id, seq) VALUES (1, ?)", (seq,))
            write_meta(db, "shard_id", str(shard_id))
        scrub(db)  # deleted entries leave no FTS segment behind
        kept = db.execute("SELECT COUNT(*) FROM memories").fetchone()[0]
        db.execute("VACUUM")
    finally:
        db.close()
    return {"entities": len(entities) - len(gone), "memories": kept}


def _delete_in(db: sqlite3.Connection, table: str, column: str, values: list[str]) -> None:
    for i in range(0, len(values), CHUNK):
        chunk = values[i:i + CHUNK]
        db.execute(f"DELETE FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk)
