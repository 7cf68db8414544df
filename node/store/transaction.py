"""SQLite transactions of a shard, and writes that span several shards as one unit."""

from __future__ import annotations

import logging
import sqlite3
from typing import Protocol, Sequence

from node.store.records import MemoryRecord

log = logging.getLogger("tellodb.shard")


class Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT`, or `ROLLBACK` on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type:
            rollback(self.db)
            return
        try:
            self.db.execute("COMMIT")
        except BaseException:
            rollback(self.db)  # a failed COMMIT (disk full) leaves the transaction open otherwise
            raise


class Staging(Protocol):
    """What `upsert_together` needs of a shard (node.store.shard.ShardStore, which imports this module)."""

    db: sqlite3.Connection
    unindexed: int

    def stage(self, records: Sequence[MemoryRecord]) -> int: ...


def rollback(db: sqlite3.Connection) -> None:
    """End the open transaction, if any, without raising: the error that led here is the one to report."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")


def upsert_together(batches: Sequence[tuple[Staging, Sequence[MemoryRecord]]]) -> None:
    """Upsert into several shards as one unit: every shard's transaction is opened and written
    before any of them commits, so a failure while writing (a bad record, a full disk) changes no
    shard. A failure during the commits themselves can still leave the shards before it committed;
    the node's free-space reserve (`min_free_mb`) is what keeps a disk from filling there."""
    opened: list[Staging] = []
    counts: list[int] = []
    committed = 0
    try:
        for store, records in batches:
            store.db.execute("BEGIN IMMEDIATE")
            opened.append(store)
            counts.append(store.stage(records))
        for store, count in zip(opened, counts):
            store.db.execute("COMMIT")
            committed += 1
            store.unindexed += count
    except BaseException:
        for store in opened[committed:]:
            rollback(store.db)
        raise
