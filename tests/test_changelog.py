"""The change log and snapshots of one shard, on real SQLite, Chroma and the real model: a snapshot
at S plus the log after S is the live shard, replay is idempotent, and an erase leaves no copy."""

from __future__ import annotations

import sqlite3
import threading

from node import id_homes
from node.store import MemoryRecord, ShardStore, file_sha256


def rec(embedder, entity, mid, text, created, relations=(), fact_key=None, metrics=()):
    return MemoryRecord(mid, entity, "s1", int(mid.rsplit("::", 1)[-1]) if mid.count("::") == 2 else None,
                        created, "conversation", text, tuple(relations), embedder.encode([text])[0],
                        tuple(metrics), fact_key)


def logical_state(store: ShardStore) -> dict:
    """Everything a copy must agree on: rows (without storage details), both FTS tables, facts,
    edges, measurements, counts, id homes."""
    q = lambda sql: sorted(tuple(r) for r in store.db.execute(sql))  # noqa: E731
    return {
        "memories": q("SELECT memory_id, entity_id, entity_token, session_id, turn_index, created_at_ms, "
                      "ingested_at_ms, kind, textual_content, relations, vector FROM memories"),
        "memories_fts": q("SELECT m.memory_id, f.textual_content FROM memories_fts f JOIN memories m ON m.rowid = f.rowid"),
        "windows": q("SELECT m.memory_id, w.window_text FROM windows_fts w JOIN memories m ON m.rowid = w.rowid"),
        "facts": q("SELECT memory_id, entity_id, slot, valid_from_ms, valid_to_ms FROM facts"),
        "edges": q("SELECT memory_id, entity_id, subject, predicate, object, timestamp_ms, valid FROM relations"),
        "measurements": q("SELECT memory_id, entity_id, label, value, unit, timestamp_ms FROM measurements"),
        "entities": q("SELECT entity_id, memories FROM entities"),
        "id_homes": q("SELECT memory_id, shard, moving_from FROM id_homes"),
    }


def first_writes(store, embedder):
    store.upsert([
        rec(embedder, "ana", "ana::s1::0", "I live in Lisbon and ran 5 km today", 1_000),
        rec(embedder, "ana", "ana::s1::1", "My sister visits next week", 2_000, relations=[("ana", "has", "sister")]),
        rec(embedder, "ana", "ana::s1::2", "Spent $12 on lunch", 3_000, metrics=[("mood", 7.0)]),
        rec(embedder, "ben", "ben::s1::0", "I work at Acme", 1_500, relations=[("ben", "works_at", "Acme")]),
        rec(embedder, "cy", "cy::s1::0", "zebracorn secret of cy", 1_000),
    ])
    id_homes.record(store, {"free-1": id_homes.Home(3, None)})


def later_writes(store, embedder):
    store.upsert([rec(embedder, "ana", "ana::s1::3", "I moved to Porto", 9_000)])  # supersedes Lisbon
    store.upsert([rec(embedder, "ana", "ana::s1::1", "My brother visits next week", 2_500)])  # a rewrite
    store.upsert([rec(embedder, "ben", "ben::s1::1", "I work at Globex now", 8_000,
                      relations=[("ben", "works_at", "Globex")])])
    store.delete("ana::s1::2")
    store.upsert([rec(embedder, "cy", "cy::s1::1", "zebracorn second secret", 5_000)])
    store.erase("cy")
    id_homes.record(store, {"free-1": id_homes.Home(5, 3), "free-2": id_homes.Home(1, None)})
    id_homes.forget(store, ["free-1"])


def test_a_snapshot_plus_the_log_after_it_is_the_live_shard(tmp_path, make_store, embedder):
    live = make_store(root=tmp_path / "live")
    first_writes(live, embedder)
    snap = live.snapshot(tmp_path / "snap.sqlite3")
    assert snap["seq"] == live.last_seq() > 0 and snap["sha256"] == file_sha256(tmp_path / "snap.sqlite3")
    later_writes(live, embedder)

    (tmp_path / "copy").mkdir()
    (tmp_path / "snap.sqlite3").rename(tmp_path / "copy" / "store.sqlite3")
    copy = make_store(root=tmp_path / "copy")
    assert copy.last_seq() == snap["seq"]
    copy.reconcile()  # the snapshot's vectors are indexed from SQLite, never re-embedded
    assert copy.stats()["vectors"] == copy.stats()["memories"]
    applied = copy.apply(live.changes_since(copy.last_seq()))
    assert applied > 0 and copy.last_seq() == live.last_seq()
    assert logical_state(copy) == logical_state(live)

    assert copy.apply(live.changes_since(0)) == 0  # replaying again, from anywhere, changes nothing
    assert logical_state(copy) == logical_state(live)
    copy.index_pending()
    query = embedder.encode(["where does ana live"])[0]
    assert ([h["memory_id"] for h in copy.search(query, "where does ana live", "ana", 5)]
            == [h["memory_id"] for h in live.search(query, "where does ana live", "ana", 5)])


def test_replay_from_an_empty_shard_rebuilds_everything(tmp_path, make_store, embedder):
    live = make_store(root=tmp_path / "live")
    first_writes(live, embedder)
    later_writes(live, embedder)
    empty = make_store(root=tmp_path / "empty")
    while empty.apply(live.changes_since(empty.last_seq(), limit=3)):  # in small pieces
        pass
    assert logical_state(empty) == logical_state(live)


def test_an_erase_leaves_no_copy_in_the_log(tmp_path, make_store, embedder):
    live = make_store(root=tmp_path / "live")
    first_writes(live, embedder)
    later_writes(live, embedder)  # erases cy, whose texts say "zebracorn"
    for f in (tmp_path / "live").rglob("*"):
        if f.is_file():
            assert b"zebracorn" not in f.read_bytes(), f
    ops = [(c.op, c.key) for c in live.changes_since(0)]
    assert ("erase", "cy") in ops and not [k for op, k in ops if k.startswith("cy::")]


def test_the_log_is_trimmed_but_never_past_a_pin(make_store, embedder):
    store = make_store()
    for i in range(20):
        store.upsert([rec(embedder, "e", f"e::s1::{i}", f"note {i}", 1_000 + i)])
    with store._tx():
        from node.store import changelog

        changelog.pin(store.db, "follower", 5)
    assert store.trim_log(keep=3) == 5  # only up to the pin
    assert store.changes_since(0)[0].seq == 6
    with store._tx():
        changelog.pin(store.db, "follower", None)
    store.trim_log(keep=3)
    assert [c.seq for c in store.changes_since(0)] == [18, 19, 20]
    assert store.last_seq() == 20


def test_the_log_remembers_how_far_it_was_trimmed_not_an_erase_s_gaps(make_store, embedder):
    store = make_store()
    store.upsert([rec(embedder, "gone", "gone::s1::0", "a note", 1_000)])
    store.upsert([rec(embedder, "kept", "kept::s1::0", "another note", 1_000)])
    store.erase("gone")  # removes change 1 from the log: a gap, not a trim
    assert store.trimmed_to() == 0 and [c.seq for c in store.changes_since(0)] == [2, 3]
    for i in range(5):
        store.upsert([rec(embedder, "kept", f"kept::s1::{i + 1}", f"note {i}", 2_000 + i)])
    assert store.trim_log(keep=2) == 5  # changes 2..6 of 1..8 go (1 was gone already)
    assert store.trimmed_to() == 6 and store.trim_log(keep=4) == 0 and store.trimmed_to() == 6


def test_a_copy_numbers_its_changes_after_the_seq_it_was_brought_up_to(tmp_path, make_store, embedder):
    store = make_store()
    store.upsert([rec(embedder, "e", "e::s1::0", "a note", 1_000)])
    store.advance_seq(10)
    store.advance_seq(4)  # never backwards
    assert store.last_seq() == 10
    store.upsert([rec(embedder, "e", "e::s1::1", "a later note", 2_000)])
    assert [c.seq for c in store.changes_since(0)] == [1, 11]
    fresh = make_store(root=tmp_path / "fresh", shard_id=1)  # no change logged yet
    fresh.advance_seq(7)
    assert fresh.last_seq() == 7


def test_a_snapshot_is_consistent_while_writes_go_on(tmp_path, make_store, embedder):
    store = make_store(root=tmp_path / "live")
    vectors = embedder.encode([f"busy note {i}" for i in range(200)])
    stop = threading.Event()

    def write():  # a second connection writing all the while, as another process would
        other = ShardStore(tmp_path / "live", 0, embedder.dimension)
        i = 0
        while not stop.is_set() and i < 200:
            other.upsert([MemoryRecord(f"w::s1::{i}", "w", "s1", i, i, None, f"busy note {i}", (), vectors[i])])
            i += 1
        other.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        snaps = [store.snapshot(tmp_path / f"snap-{k}.sqlite3") for k in range(3)]
    finally:
        stop.set()
        writer.join()
    for k, snap in enumerate(snaps):
        db = sqlite3.connect(tmp_path / f"snap-{k}.sqlite3")
        rows = db.execute("SELECT COUNT(*) FROM memories").fetchone()[0]
        upserts = db.execute("SELECT COUNT(*) FROM changes WHERE op = 'upsert'").fetchone()[0]
        assert rows == upserts == snap["seq"]  # each snapshot is one instant: rows and log agree
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
