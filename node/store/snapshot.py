"""A shard that travels: a consistent copy of its SQLite file, to back up or to seed another copy."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import node.store.changelog as changelog
from node.store.transaction import Transaction


def snapshot(source_path: Path, shard_id: int, dest: str | Path) -> dict[str, Any]:
    """A consistent copy of a shard's SQLite file at a known sequence number, with its sha256.

    Safe from any thread while the shard serves: `VACUUM INTO` runs on a connection of its own
    in one read transaction (WAL: writers go on). The copy marks every row unindexed, so
    the shard it becomes builds its vector index from the stored vectors, never re-embedding.
    """
    dest = Path(dest)
    source = sqlite3.connect(source_path)
    try:
        source.execute("VACUUM INTO ?", (str(dest),))
    finally:
        source.close()
    copy = sqlite3.connect(dest, isolation_level=None)
    try:
        copy.execute("PRAGMA journal_mode=DELETE")
        with Transaction(copy):
            copy.execute("UPDATE memories SET indexed = 0")
            copy.execute("DELETE FROM log_pins")
        seq = changelog.last_seq(copy)
    finally:
        copy.close()
    return {"shard": shard_id, "seq": seq, "bytes": dest.stat().st_size, "sha256": file_sha256(dest)}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
