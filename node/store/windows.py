"""Lexical windows: each turn indexed together with its session neighbours.

Lexical search runs over two FTS5 tables: `memories_fts` (each memory's own text) and
`windows_fts` (each turn with its session neighbours within `window_radius` turns, so a question
matches the exchange that answers it even when the words are split over several turns). Memories
without a turn number have a window of their own text. Windows are kept current in the same
transaction as every write and rebuilt when `window_radius` changes.
"""

from __future__ import annotations

import sqlite3
from typing import Iterable

from node.store.schema import read_meta, write_meta
from node.store.transaction import Transaction


def check_windows(db: sqlite3.Connection, radius: int) -> None:
    """Rebuild every window when the configured radius differs from the one they were built with."""
    built = read_meta(db, "window_radius")
    if built is not None and int(built) == radius:
        return
    with Transaction(db):
        db.execute("DELETE FROM windows_fts")
        rewrite_windows(db, radius, [row[0] for row in db.execute("SELECT rowid FROM memories").fetchall()])
        write_meta(db, "window_radius", str(radius))


def window_targets(db: sqlite3.Connection, radius: int, rowids: Iterable[int]) -> set[int]:
    """`rowids` and their session neighbours within `radius`, at their current places:
    the windows a change to those rows alters. Take them before a row moves or goes."""
    targets: set[int] = set()
    for rowid in rowids:
        targets.add(rowid)
        me = db.execute("SELECT entity_id, session_id, turn_index FROM memories WHERE rowid = ?",
                        (rowid,)).fetchone()
        if me is not None:
            targets.update(session_neighbours(db, radius, me["entity_id"], me["session_id"], me["turn_index"]))
    return targets


def session_neighbours(db: sqlite3.Connection, radius: int, entity_id: str, session_id: str,
                       turn_index: int | None) -> list[int]:
    """Rowids of the turns within `radius` of `turn_index` in the entity's session, as they are now
    (none for a memory without a turn, or with windows off): whose windows a write at that turn alters."""
    if radius <= 0 or turn_index is None:
        return []
    return [x[0] for x in db.execute(
        "SELECT rowid FROM memories WHERE entity_id = ? AND session_id = ? AND turn_index BETWEEN ? AND ?",
        (entity_id, session_id, turn_index - radius, turn_index + radius))]


def rewrite_windows(db: sqlite3.Connection, radius: int, rowids: Iterable[int]) -> None:
    """Rewrite the window documents of `rowids` from the rows as they are now (rows that are gone
    lose theirs). In a transaction."""
    for rowid in rowids:
        me = db.execute(
            "SELECT entity_id, entity_token, session_id, turn_index, textual_content FROM memories WHERE rowid = ?",
            (rowid,)).fetchone()
        db.execute("DELETE FROM windows_fts WHERE rowid = ?", (rowid,))
        if me is None:
            continue
        text = me["textual_content"]
        if me["turn_index"] is not None and radius > 0:
            text = "\n".join(x[0] for x in db.execute(
                "SELECT textual_content FROM memories WHERE entity_id = ? AND session_id = ? "
                "AND turn_index BETWEEN ? AND ? ORDER BY turn_index, rowid",
                (me["entity_id"], me["session_id"], me["turn_index"] - radius, me["turn_index"] + radius)))
        db.execute("INSERT INTO windows_fts(rowid, entity_token, window_text) VALUES (?, ?, ?)",
                   (rowid, me["entity_token"], text))
