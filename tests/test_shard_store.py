"""The shard store on real SQLite, real Chroma and the real model."""

import shutil
import sqlite3

import numpy as np
import pytest

from node.store import MemoryRecord


def records(embedder, entity, texts, start=0, relations=()):
    vecs = embedder.encode(list(texts))
    out = []
    for i, (t, v) in enumerate(zip(texts, vecs), start):
        mid = f"{entity}::s1::{i}"
        out.append(MemoryRecord(mid, entity, "s1", i, 1_000 + i, "conversation", t, tuple(relations), v))
    return out


def search(store, embedder, text, entity, limit=10):
    return store.search(embedder.encode([text])[0], text, entity, limit)


@pytest.fixture(params=["exact", "hnsw"])
def dense_path(request):
    """Run a test on both dense paths: the exact scan of small scopes, and Chroma's HNSW index."""
    return (lambda store: store) if request.param == "exact" else _hnsw_only


def _hnsw_only(store):
    store.exact_scan = store.shard_exact_scan = 0
    return store


def test_upsert_then_search_ranks_the_relevant_memory_first(make_store, embedder, dense_path):
    s = dense_path(make_store())
    s.upsert(records(embedder, "sarah", [
        "User prefers dark mode and uses a screen reader",
        "User works at Acme Corp as a software engineer",
        "Had pasta for dinner on Friday",
    ]))
    hits = search(s, embedder, "What are the user's accessibility preferences?", "sarah")
    assert hits[0]["textual_content"].startswith("User prefers dark mode")
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True) and all(0 <= x <= 1 for x in sims)


def test_exactly_min_limit_and_count_hits(make_store, embedder, dense_path):
    s = dense_path(make_store())
    s.upsert(records(embedder, "a", [f"note number {i} about gardening" for i in range(7)]))
    s.upsert(records(embedder, "b", [f"other note {i}" for i in range(5)]))
    assert len(search(s, embedder, "gardening", "a", limit=3)) == 3
    assert len(search(s, embedder, "gardening", "a", limit=50)) == 7
    assert len(search(s, embedder, "zzzz unrelated", "a", limit=50)) == 7  # no lexical match, still all
    assert len(search(s, embedder, "gardening", None, limit=50)) == 12


def test_entity_isolation(make_store, embedder, dense_path):
    s = dense_path(make_store())
    s.upsert(records(embedder, "alice", ["Alice's passport number is K1234567"]))
    s.upsert(records(embedder, "bob", ["I like trains"]))
    hits = search(s, embedder, "passport number K1234567", "bob", limit=10)
    assert [h["entity_id"] for h in hits] == ["bob"]


def test_exact_tokens_are_found_among_distractors(make_store, embedder, dense_path):
    s = dense_path(make_store())
    texts = [f"Order {n} shipped to the warehouse" for n in range(40000, 40040)]
    texts.append("The door code is ZX-99817, remember it")
    s.upsert(records(embedder, "e", texts))
    assert search(s, embedder, "ZX-99817", "e")[0]["textual_content"].startswith("The door code")
    assert search(s, embedder, "order 40017", "e")[0]["textual_content"] == "Order 40017 shipped to the warehouse"


def test_reingest_replaces_and_counts_stay_right(make_store, embedder, dense_path):
    s = dense_path(make_store())
    s.upsert(records(embedder, "e", ["I live in Austin"]))
    s.index_pending()
    s.upsert(records(embedder, "e", ["I live in Seattle"]))  # same id e::s1::0; Chroma still has Austin
    assert s.get("e::s1::0")["textual_content"] == "I live in Seattle"
    assert [h["textual_content"] for h in search(s, embedder, "Austin", "e")] == ["I live in Seattle"]
    assert s.index_pending() == 1
    assert s.stats()["memories"] == 1 and s.stats()["vectors"] == 1
    assert s.entity_count("e") == 1
    hits = search(s, embedder, "Austin", "e")
    assert [h["textual_content"] for h in hits] == ["I live in Seattle"]
    fts = s.db.execute("SELECT COUNT(*) FROM memories_fts WHERE memories_fts MATCH 'austin'").fetchone()[0]
    assert fts == 0


def test_unindexed_rows_are_searchable_until_indexed_in_one_batch(make_store, embedder, dense_path):
    s = dense_path(make_store())
    s.upsert(records(embedder, "e", ["My daughter started violin lessons", "The car needs new tyres",
                                     "We adopted a grey kitten named Smoke"]))
    assert s.stats()["unindexed"] == 3 and s.collection.count() == 0
    # No word in common with the answer: only the vector path can find it.
    before = search(s, embedder, "a new pet cat", "e")
    assert before[0]["textual_content"] == "We adopted a grey kitten named Smoke"
    kitten = embedder.encode(["We adopted a small grey kitten named Smoke"])[0]
    assert s.nearest("e", kitten, "other")[0] == "e::s1::2"
    assert s.index_pending() == 3
    assert (s.stats()["unindexed"], s.collection.count()) == (0, 3)
    assert search(s, embedder, "a new pet cat", "e") == before


def test_a_stale_index_entry_never_leaks_into_another_entity(make_store, embedder, dense_path):
    s = dense_path(make_store())
    s.upsert(records(embedder, "a", ["grocery list: eggs and milk"]))
    secret = records(embedder, "a", ["the launch code is 7 7 1 9"], start=1)[0]
    s.upsert([secret])
    s.index_pending()  # Chroma now files the id under entity a
    moved = MemoryRecord(secret.memory_id, "b", "s1", 1, 2_000, None, "the launch code is 7 7 1 9", (),
                         secret.vector)
    s.upsert([moved])  # the same id now belongs to b; Chroma's copy is stale until indexed
    assert [h["entity_id"] for h in search(s, embedder, "launch code", "a")] == ["a"]
    assert s.nearest("a", secret.vector, "none")[0] != secret.memory_id


def test_delete_removes_row_fts_relations_and_vector(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", ["Bob works at Initech"], relations=[("e", "works_at", "Initech")]))
    s.index_pending()
    assert s.db.execute("SELECT COUNT(*) FROM relations").fetchone()[0] == 1
    assert s.delete("e::s1::0") is True
    assert s.delete("e::s1::0") is False
    assert s.get("e::s1::0") is None
    assert s.db.execute("SELECT COUNT(*) FROM relations").fetchone()[0] == 0
    assert s.db.execute("SELECT COUNT(*) FROM memories_fts WHERE memories_fts MATCH 'initech'").fetchone()[0] == 0
    assert s.collection.count() == 0
    assert s.entity_count("e") == 0
    assert search(s, embedder, "Initech", "e") == []


def test_turn_window(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", [f"turn {i}" for i in range(10)]))
    window = s.turn_window("e::s1::5", 2)
    assert [m["turn_index"] for m in window] == [3, 4, 5, 6, 7]
    assert s.turn_window("nope", 2) == []


def test_batch_is_atomic(make_store, embedder):
    s = make_store()
    good = records(embedder, "e", ["one", "two"])
    bad = MemoryRecord("e::s1::9", "e", "s1", 9, 1, None, "bad", (), np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError):
        s.upsert(good + [bad])
    assert s.stats()["memories"] == 0 and s.collection.count() == 0


def test_rows_missing_from_chroma_are_reindexed_on_open(tmp_path, make_store, embedder):
    root = tmp_path / "shard"
    s = make_store(root=root)
    s.upsert(records(embedder, "e", ["the cat sat on the mat", "dogs bark at night"]))
    s.index_pending()
    # Simulate a crash between the SQLite commit and the Chroma add.
    s.db.execute("UPDATE memories SET indexed = 0 WHERE memory_id = 'e::s1::1'")
    s.collection.delete(ids=["e::s1::1"])
    s.close()
    s2 = make_store(root=root)
    assert s2.reconcile() == 1
    stats = s2.stats()
    assert (stats["memories"], stats["entities"], stats["unindexed"], stats["vectors"]) == (2, 1, 0, 2)


def test_a_lost_chroma_index_is_rebuilt_from_sqlite(tmp_path, make_store, embedder):
    root = tmp_path / "shard"
    s = make_store(root=root)
    s.upsert(records(embedder, "e", [f"memory {i}" for i in range(30)]))
    assert s.index_pending() == 30  # indexed, so only the repair branch of reconcile() can bring them back
    s.close()
    shutil.rmtree(root / "chroma")
    s2 = make_store(root=root)
    assert s2.reconcile() == 30
    assert s2.collection.count() == 30
    res = s2.collection.query(query_embeddings=embedder.encode(["memory 7"]), n_results=1, where={"entity_id": "e"})
    assert res["ids"][0] == ["e::s1::7"]


def test_orphan_vectors_are_removed_on_reconcile(tmp_path, make_store, embedder):
    root = tmp_path / "shard"
    s = make_store(root=root)
    s.upsert(records(embedder, "e", ["kept", "deleted"]))
    assert s.index_pending() == 2
    # Simulate a crash after the SQLite delete committed but before Chroma heard of it.
    s.db.execute("DELETE FROM memories WHERE memory_id = 'e::s1::1'")
    s.close()
    s2 = make_store(root=root)
    s2.reconcile()
    assert s2.collection.get(include=[])["ids"] == ["e::s1::0"]


def test_sqlite_is_the_durable_source_of_truth(tmp_path, make_store, embedder):
    root = tmp_path / "shard"
    s = make_store(root=root)
    s.upsert(records(embedder, "e", ["durable"]))
    # Another connection sees the committed row at once: the write is not parked in memory.
    other = sqlite3.connect(root / "store.sqlite3")
    assert other.execute("SELECT textual_content, length(vector) FROM memories").fetchall() == [("durable", 384 * 4)]
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_dimension_mismatch_is_refused(tmp_path, make_store, embedder):
    from node.store import ShardStore

    root = tmp_path / "shard"
    make_store(root=root).close()
    with pytest.raises(RuntimeError, match="384-dimensional"):
        ShardStore(root, 0, 768)


def test_window_search_finds_the_turn_whose_neighbour_holds_the_words(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", [
        "Anna: guess where we went last weekend",
        "Ben: no idea, tell me",
        "Anna: the aquarium downtown, the kids loved the sharks",
        "Ben: I adopted a kitten yesterday",
    ] + [f"Anna: filler line {i} about nothing" for i in range(20)]))
    rows = dict(s.db.execute(
        "SELECT m.memory_id, w.window_text FROM windows_fts w JOIN memories m ON m.rowid = w.rowid"))
    assert rows["e::s1::0"].split("\n") == [
        "Anna: guess where we went last weekend", "Ben: no idea, tell me",
        "Anna: the aquarium downtown, the kids loved the sharks"]
    ids = [h["memory_id"] for h in search(s, embedder, "aquarium sharks", "e", limit=5)]
    assert ids[0] == "e::s1::2" and "e::s1::0" in ids  # the question turn rides on its neighbour's words


def test_windows_follow_deletes_and_replacements(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", ["alpha", "bravo", "charlie"]))
    window = lambda mid: s.db.execute(  # noqa: E731
        "SELECT window_text FROM windows_fts w JOIN memories m ON m.rowid = w.rowid WHERE m.memory_id = ?",
        (mid,)).fetchone()[0]
    assert window("e::s1::0") == "alpha\nbravo\ncharlie"
    s.delete("e::s1::1")
    assert window("e::s1::0") == "alpha\ncharlie"
    s.upsert(records(embedder, "e", ["delta"], start=2))  # replaces e::s1::2
    assert window("e::s1::0") == "alpha\ndelta"
    assert s.db.execute("SELECT COUNT(*) FROM windows_fts").fetchone()[0] == 2


def test_memories_without_turns_have_their_own_text_as_window(make_store, embedder):
    s = make_store()
    vec = embedder.encode(["a", "b"])
    s.upsert([MemoryRecord(f"e::sdk::{i}", "e", "sdk", None, 1, None, t, (), v)
              for i, (t, v) in enumerate(zip(["apples", "pears"], vec))])
    texts = sorted(r[0] for r in s.db.execute("SELECT window_text FROM windows_fts"))
    assert texts == ["apples", "pears"]
    assert s.get("e::sdk::0")["turn_index"] == 0
    assert [m["memory_id"] for m in s.turn_window("e::sdk::0", 2)] == ["e::sdk::0"]


def test_windows_are_rebuilt_when_the_radius_changes(tmp_path, embedder):
    from node.ranking import RankingConfig
    from node.store import ShardStore

    root = tmp_path / "shard"
    s = ShardStore(root, 0, embedder.dimension, ranking=RankingConfig(window_radius=1))
    s.upsert(records(embedder, "e", ["one", "two", "three", "four"]))
    s.close()
    s = ShardStore(root, 0, embedder.dimension, ranking=RankingConfig(window_radius=0))
    assert sorted(r[0] for r in s.db.execute("SELECT window_text FROM windows_fts")) == ["four", "one", "three", "two"]
    s.close()


def test_search_within_a_time_window(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", [f"I visited the museum on day {i}" for i in range(10)]))  # created 1000..1009
    hits = s.search(embedder.encode(["museum"])[0], "museum", "e", 10, (1003, 1005))
    assert sorted(h["created_at_ms"] for h in hits) == [1003, 1004, 1005]
    assert len(s.search(embedder.encode(["museum"])[0], "museum", "e", 10, (None, 1001))) == 2
    assert len(s.search(embedder.encode(["museum"])[0], "museum", "e", 10, (1008, None))) == 2
    assert s.search(embedder.encode(["museum"])[0], "museum", "e", 10, (5000, 6000)) == []
    in_order = s.in_window("e", (1002, 1006), 3)
    assert [h["created_at_ms"] for h in in_order] == [1002, 1003, 1004]
    assert hits[0]["similarity"] >= hits[-1]["similarity"]


def test_erase_leaves_no_trace_in_any_file(tmp_path, make_store, embedder):
    root = tmp_path / "shard"
    s = make_store(root=root)
    s.upsert(records(embedder, "gone", [f"secret zebracorn{i} passport" for i in range(30)],
                     relations=[("gone", "has", "zebracorn-passport")]))
    s.upsert(records(embedder, "kept", ["kept memory about zebras"]))
    counts = s.erase("gone")
    assert counts == {"memories": 30, "relations": 30, "measurements": 0}
    assert s.entity_count("gone") == 0 and s.stats()["vectors"] == 1
    assert search(s, embedder, "zebracorn passport", "gone") == []
    assert [h["entity_id"] for h in search(s, embedder, "zebracorn passport", None)] == ["kept"]
    for f in root.rglob("*"):
        if f.is_file():
            assert b"zebracorn" not in f.read_bytes(), f
    assert s.erase("gone") == {"memories": 0, "relations": 0, "measurements": 0}


def test_export_pages_through_an_entity(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", [f"m{i}" for i in range(7)]))
    s.upsert(records(embedder, "other", ["x"]))
    first = s.export_page("e", 0, 5)
    rest = s.export_page("e", first[-1]["rowid"], 5)
    assert [m["textual_content"] for m in first + rest] == [f"m{i}" for i in range(7)]
    assert s.export_page("e", rest[-1]["rowid"], 5) == []


def test_cached_entity_vectors_follow_every_write(make_store, embedder):
    s = make_store()
    s.upsert(records(embedder, "e", ["I play the cello", "My car is blue"]))
    assert search(s, embedder, "musical instrument", "e")[0]["textual_content"] == "I play the cello"
    assert s.vector_cache.get(0, "e") is not None  # the scan loaded it
    s.upsert(records(embedder, "e", ["I play the trumpet"]))  # replaces e::s1::0
    assert s.vector_cache.get(0, "e") is None
    assert search(s, embedder, "brass instrument", "e")[0]["textual_content"] == "I play the trumpet"
    s.delete("e::s1::0")
    assert [h["textual_content"] for h in search(s, embedder, "brass instrument", "e")] == ["My car is blue"]
    s.erase("e")
    assert search(s, embedder, "brass instrument", "e") == []


def test_a_whole_shards_cached_matrix_follows_every_write_of_any_entity(make_store, embedder):
    """A query without an entity scans the shard's matrix from the cache (WHOLE_SHARD); a write of
    any entity, a delete or an erase drops it."""
    from node.vector_cache import WHOLE_SHARD

    s = make_store()
    s.upsert(records(embedder, "e", ["I play the cello", "My car is blue"]))
    assert search(s, embedder, "musical instrument", None)[0]["textual_content"] == "I play the cello"
    assert s.vector_cache.get(0, WHOLE_SHARD) is not None  # the scan loaded it
    s.upsert(records(embedder, "f", ["I play the trumpet"]))  # another entity
    assert s.vector_cache.get(0, WHOLE_SHARD) is None
    assert search(s, embedder, "brass instrument", None)[0]["textual_content"] == "I play the trumpet"
    s.delete("f::s1::0")
    assert "I play the trumpet" not in [h["textual_content"] for h in search(s, embedder, "brass instrument", None)]
    s.erase("e")
    assert search(s, embedder, "musical instrument", None) == []


def test_whole_shards_take_at_most_half_the_vector_cache_and_entity_reads_keep_them():
    from node.vector_cache import WHOLE_SHARD, EntityVectors, VectorCache

    def entry(rows: int) -> EntityVectors:
        return EntityVectors(np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros((rows, 4), np.float32))

    size = entry(10).nbytes  # 320 bytes
    cache = VectorCache(max_bytes=4 * size)
    assert cache.room_for_shard(size) and cache.room_for_shard(2 * size) and not cache.room_for_shard(2 * size + 1)
    cache.put(0, WHOLE_SHARD, entry(10))
    cache.put(0, "e", entry(10))  # an entity's read of the same shard does not drop the shard's matrix
    assert (0, WHOLE_SHARD) in cache and cache.shard_bytes == size and cache.bytes == 2 * size
    assert cache.room_for_shard(size) and not cache.room_for_shard(size + 1)
    cache.put(1, WHOLE_SHARD, entry(10))
    cache.put(1, "f", entry(10))
    cache.put(2, "g", entry(10))  # over budget: the oldest entry, shard 0's matrix, leaves
    assert (0, WHOLE_SHARD) not in cache and cache.shard_bytes == size and cache.bytes == 4 * size
    cache.drop(1, "f")  # a write of shard 1 drops its matrix too
    assert cache.shard_bytes == 0 and cache.bytes == 2 * size and cache.hits == cache.misses == 0


def test_the_vector_cache_stays_within_its_budget(tmp_path, embedder):
    from node.store import ShardStore
    from node.vector_cache import VectorCache

    cache = VectorCache(max_bytes=3 * 384 * 4 + 1000)  # room for about three vectors
    s = ShardStore(tmp_path / "s", 0, embedder.dimension, vector_cache=cache)
    try:
        for ent in ("a", "b", "c"):
            s.upsert(records(embedder, ent, [f"{ent} one", f"{ent} two"]))
            search(s, embedder, "one", ent)
        assert cache.bytes <= cache.max_bytes
        assert cache.get(0, "a") is None and cache.get(0, "c") is not None  # least recently used left first
        assert search(s, embedder, "two", "a")[0]["textual_content"] == "a two"  # reloaded on demand
    finally:
        s.close()


def test_a_search_limited_to_entity_prefixes_sees_only_them(make_store, embedder, dense_path):
    s = dense_path(make_store())
    for entity in ("acme:ann", "acme:bob", "globex:cy", "acmeX:dan"):
        s.upsert(records(embedder, entity, [f"the quarterly roadmap of {entity}", f"lunch plans of {entity}"]))
    s.index_pending()
    hits = s.search(embedder.encode(["quarterly roadmap"])[0], "quarterly roadmap", None, 10, None, ("acme:",))
    assert sorted({h["entity_id"] for h in hits}) == ["acme:ann", "acme:bob"] and len(hits) == 4
    both = s.search(embedder.encode(["roadmap"])[0], "roadmap", None, 10, None, ("acme:", "globex:"))
    assert {h["entity_id"] for h in both} == {"acme:ann", "acme:bob", "globex:cy"}
    timed = s.in_window(None, (None, None), 10, ("globex:",))
    assert {h["entity_id"] for h in timed} == {"globex:cy"} and len(timed) == 2


def test_prefix_ranges_are_exact_at_the_edges():
    from node.store.scope import Scope, _successor

    assert _successor("acme:") == "acme;" and _successor("a\U0010ffff") == "b" and _successor("\U0010ffff") is None
    scope = Scope.of(None, None, ("acme:",))
    assert scope.admits("acme:x", 0) and not scope.admits("acme", 0) and not scope.admits("globex:acme:", 0)
