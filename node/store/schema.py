"""The shard's SQLite file: its tables, how a connection to it is opened, and its `meta` table.

The file is the shard's source of truth (memories, their vectors, FTS5 indexes, relations,
measurements, facts, id homes, the change log); everything else a shard holds derives from it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator, Sequence

import node.store.changelog as changelog
from node.store.transaction import Transaction

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    rowid INTEGER PRIMARY KEY,
    memory_id TEXT NOT NULL UNIQUE,
    entity_id TEXT NOT NULL,
    entity_token TEXT NOT NULL,
    session_id TEXT NOT NULL,
    turn_index INTEGER,
    created_at_ms INTEGER NOT NULL,
    ingested_at_ms INTEGER NOT NULL,
    kind TEXT,
    textual_content TEXT NOT NULL,
    relations TEXT NOT NULL,
    vector BLOB NOT NULL,
    indexed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS memories_by_session ON memories(entity_id, session_id, turn_index);
CREATE INDEX IF NOT EXISTS memories_by_time ON memories(entity_id, created_at_ms);
CREATE INDEX IF NOT EXISTS memories_unindexed ON memories(indexed) WHERE indexed = 0;
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
    entity_token, textual_content,
    content='memories', content_rowid='rowid',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS memories_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts(rowid, entity_token, textual_content)
    VALUES (new.rowid, new.entity_token, new.textual_content);
END;
CREATE TRIGGER IF NOT EXISTS memories_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts(memories_fts, rowid, entity_token, textual_content)
    VALUES ('delete', old.rowid, old.entity_token, old.textual_content);
END;
CREATE TRIGGER IF NOT EXISTS memories_au AFTER UPDATE OF entity_token, textual_content ON memories BEGIN
    INSERT INTO memories_fts(memories_fts, rowid, entity_token, textual_content)
    VALUES ('delete', old.rowid, old.entity_token, old.textual_content);
    INSERT INTO memories_fts(rowid, entity_token, textual_content)
    VALUES (new.rowid, new.entity_token, new.textual_content);
END;
CREATE VIRTUAL TABLE IF NOT EXISTS windows_fts USING fts5(
    entity_token, window_text,
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS memories_window_ad AFTER DELETE ON memories BEGIN
    DELETE FROM windows_fts WHERE rowid = old.rowid;
END;
CREATE TABLE IF NOT EXISTS relations (
    memory_id TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    predicate TEXT NOT NULL,
    object TEXT NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    valid INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS relations_by_memory ON relations(memory_id);
CREATE INDEX IF NOT EXISTS relations_by_subject ON relations(subject, predicate);
CREATE INDEX IF NOT EXISTS relations_by_object ON relations(object, predicate);
CREATE TABLE IF NOT EXISTS entities (entity_id TEXT PRIMARY KEY, memories INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS measurements (
    memory_id TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    label TEXT NOT NULL,
    value REAL NOT NULL,
    unit TEXT,
    timestamp_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS measurements_by_label ON measurements(entity_id, label, timestamp_ms);
CREATE INDEX IF NOT EXISTS measurements_by_memory ON measurements(memory_id);
CREATE TABLE IF NOT EXISTS facts (
    memory_id TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    slot TEXT NOT NULL,
    valid_from_ms INTEGER NOT NULL,
    valid_to_ms INTEGER,
    PRIMARY KEY (memory_id, slot)
);
CREATE INDEX IF NOT EXISTS facts_by_slot ON facts(entity_id, slot, valid_from_ms);
-- The home of each free-form memory id whose hash falls on this shard (node/id_homes.py).
CREATE TABLE IF NOT EXISTS id_homes (
    memory_id TEXT PRIMARY KEY,
    shard INTEGER NOT NULL,
    moving_from INTEGER
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS memories_measurements_ad AFTER DELETE ON memories BEGIN
    DELETE FROM measurements WHERE memory_id = old.memory_id;
    DELETE FROM relations WHERE memory_id = old.memory_id;
END;
"""

# The FTS5 tables lexical search reads, each with its text column (see node/store/windows.py).
LEXICAL_SOURCES = (("memories_fts", "textual_content"), ("windows_fts", "window_text"))
MMAP_BYTES = 1 << 30  # address space per shard file; only pages read take memory
IN_LIST = 900  # values bound in one `IN (...)`: under the 999 parameters of older SQLite builds


def rows_in(db: sqlite3.Connection, sql: str, values: Sequence, before: Sequence = ()) -> Iterator:
    """The rows of `sql` for `values`, IN_LIST at a time: its `{marks}` is where they go (an
    `IN ({marks})`), after the parameters `before`."""
    for i in range(0, len(values), IN_LIST):
        chunk = list(values[i:i + IN_LIST])
        yield from db.execute(sql.format(marks=",".join("?" * len(chunk))), (*before, *chunk))


def connect(path: Path) -> sqlite3.Connection:
    """Open (and create if needed) a shard file for the shard's own use."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed: an erase leaves no copy
    # Reads map the file instead of copying pages into a per-connection cache: a 1,000-memory
    # entity's vector scan takes 0.7 ms instead of 1.3 ms, and mapped pages are the OS page
    # cache (shared, reclaimable), not the process's own memory.
    db.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
    db.executescript(SCHEMA)
    db.executescript(changelog.SCHEMA)
    return db


def check_meta(db: sqlite3.Connection, shard_id: int, dimension: int, root: Path) -> None:
    """Stamp a new shard file; refuse one written with vectors of another dimension."""
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if not meta:
        with Transaction(db):
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("dimension", str(dimension)),
                 ("shard_id", str(shard_id)), ("id_homes", "1")],
            )
        return
    if int(meta.get("dimension", dimension)) != dimension:
        raise RuntimeError(
            f"shard {shard_id} at {root} holds {meta['dimension']}-dimensional vectors but the "
            f"configured model makes {dimension}; use the model it was written with"
        )


def read_meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else row[0]


def write_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    """In a transaction: set a `meta` key."""
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
