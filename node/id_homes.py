"""Where each free-form memory id lives, so an id names one memory in the whole cluster.

An id of the form `<entity>::<session>::<turn>` lives in its entity's shard: its place follows
from the id. A free-form id (any other string) can be written under any entity, so its place is
recorded: each free-form id has a *home shard*, chosen by hashing the id, whose `id_homes` table
says which shard holds the memory. The node that owns the home shard serialises every write and
delete of the id (one lock per id), which makes moving an id between entities one operation:

1. record the intent: `shard` = the new shard, `moving_from` = the old one;
2. write the memory into the new shard (through its node);
3. delete it from the old shard, then clear `moving_from`.

A crash between the steps leaves `moving_from` set; the next write or delete of the id settles it
(the new copy exists: drop the old one; it does not: point back to the old one), and a read looks in
both. Every other node is left out, so a node's restart affects only ids whose home or memory it
holds. The table lives in the home shard, so it travels with the shard, and its changes are in the
shard's change log (node/store/changelog.py).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Iterable, NamedTuple, Protocol

import node.store.changelog as changelog
from node.store.schema import rows_in
from node.store.transaction import Transaction


class HomeTable(Protocol):
    """A shard's store as this module needs it (node.store.shard.ShardStore, which imports this module)."""

    db: sqlite3.Connection


class Home(NamedTuple):
    shard: int
    moving_from: int | None


def lookup(store: HomeTable, ids: Iterable[str]) -> dict[str, Home]:
    ids = list(ids)
    found: dict[str, Home] = {}
    for memory_id, shard, moving_from in rows_in(
            store.db, "SELECT memory_id, shard, moving_from FROM id_homes WHERE memory_id IN ({marks})", ids):
        found[memory_id] = Home(shard, moving_from)
    return found


def record(store: HomeTable, homes: dict[str, Home]) -> None:
    with Transaction(store.db):
        for memory_id, home in homes.items():
            set_row(store, memory_id, home)


def forget(store: HomeTable, ids: Iterable[str], erased: bool = False) -> None:
    """Drop ids' records. For an erased entity's ids, their earlier log entries go too, and a
    `forget` change takes the same away from every follower copy (a stale record left in an older
    copy points to a memory that is gone, which reads as absent)."""
    with Transaction(store.db):
        for memory_id in ids:
            if erased:
                forget_row(store, memory_id)
            else:
                drop_row(store, memory_id)


def forget_row(store: HomeTable, memory_id: str, seq: int | None = None) -> None:
    """In a transaction: drop an erased entity's id's record and its log entries, and log that."""
    store.db.execute("DELETE FROM id_homes WHERE memory_id = ?", (memory_id,))
    store.db.execute("DELETE FROM changes WHERE key = ? AND op IN (?, ?)",
                     (memory_id, changelog.HOME, changelog.UNHOME))
    changelog.record(store.db, changelog.FORGET, memory_id, seq=seq)


def set_row(store: HomeTable, memory_id: str, home: Home, seq: int | None = None) -> None:
    """In a transaction: record `home`, and log it."""
    store.db.execute("INSERT OR REPLACE INTO id_homes(memory_id, shard, moving_from) VALUES (?, ?, ?)",
                     (memory_id, home.shard, home.moving_from))
    changelog.record(store.db, changelog.HOME, memory_id, body=list(home), seq=seq)


def drop_row(store: HomeTable, memory_id: str, seq: int | None = None) -> None:
    """In a transaction: drop the record, and log it."""
    store.db.execute("DELETE FROM id_homes WHERE memory_id = ?", (memory_id,))
    changelog.record(store.db, changelog.UNHOME, memory_id, seq=seq)


def home_of(change: changelog.Change) -> Home:
    return Home(*json.loads(change.body))
