"""A node's index over its shards (node/node_index.py: the lexicon and the 8-bit vectors) and the
search that spans them (node/spanning_search.py), on real SQLite, Chroma, ONNX Runtime and the model."""

from __future__ import annotations

import random

import numpy as np
import pytest

from loadtest.texts import sentence
import node.node_slots
import node.node_vectors
import node.spanning_search
from node.lexicon import Lexicon
from node.node_index import _MEMORIES, _WINDOWS, NodeIndex
from node.four_bit_scan import FourBitScan, group_for, model_bytes, pack
from node.node_vectors import SCORES_MODEL, quantize
from node.spanning_search import search_shards
from node.store.scope import Scope
from node.store.search import CANDIDATE_COLUMNS
from node.store import MemoryRecord

ENTITIES = [f"user-{i}" for i in range(8)]
QUERIES = ["garden tomatoes in the morning", "train tickets to the coast", "what did she cook for dinner",
           "the old piano lessons", "music", "zzzz nothing matches this"]


@pytest.fixture(scope="module")
def data(embedder):
    """240 memories: 8 entities, each 3 sessions of 10 turns, texts over a Zipf vocabulary."""
    rng = random.Random(11)
    texts = [sentence(rng, i) for i in range(240)]
    vectors = embedder.encode(texts)
    out = []
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        entity, session, turn = ENTITIES[i % 8], f"s{i // 8 % 3}", i // 24
        out.append(MemoryRecord(f"{entity}::{session}::{turn}", entity, session, turn, 1_000 + i, "conversation",
                                text, (), vector))
    return out


def spread(make_store, records, shards: int) -> dict:
    """The records over `shards` stores, each entity on one (as placement does)."""
    stores = {s: make_store(shard_id=s) for s in range(shards)}
    for s, store in stores.items():
        store.upsert([r for r in records if ENTITIES.index(r.entity_id) % shards == s])
    return stores


def same(hits, others) -> bool:
    """The same memories in the same order, similarities equal but for float32 rounding."""
    return ([h["memory_id"] for h in hits] == [h["memory_id"] for h in others]
            and all(abs(a["similarity"] - b["similarity"]) < 1e-6 for a, b in zip(hits, others)))


def test_a_search_over_shards_answers_as_one_shard_holding_them_all(make_store, embedder, data):
    """Over the node's rows, BM25 is one shard's holding them all, and the dense pool is the nearest
    of all: the same hits, in the same order, with the same similarities, for every scope."""
    whole = make_store(shard_id=99)
    whole.upsert(data)
    stores = spread(make_store, data, 4)
    index = NodeIndex(embedder.dimension)
    assert index.sync(stores, stores, max_rows=10_000)
    assert index.rows == len(data) and index.loads == 4
    for text in QUERIES:
        vector = embedder.encode([text])[0]
        for limit, window, prefixes in [(10, None, None), (50, None, None), (5, (1_040, 1_180), None),
                                        (10, None, ("user-1", "user-6")), (300, (1_100, None), ("user-2",))]:
            alone = whole.search(vector, text, None, limit, window, prefixes)
            spanning = search_shards(index, stores, vector, text, limit, window, prefixes)
            assert same(spanning, alone), (text, limit, window, prefixes)
            assert len(spanning) == min(limit, sum(1 for r in data if (window is None or (
                r.created_at_ms >= window[0] and (window[1] is None or r.created_at_ms <= window[1])))
                and (prefixes is None or r.entity_id.startswith(prefixes))))


def contents(index: NodeIndex, shard: int) -> tuple:
    """What the index holds of a shard: both lexicon tables' documents (rowid -> length, words),
    (rowid, entity, codes) of its vectors, and the rows scoring reads."""
    seg = index.vectors.segments.get(shard)
    vectors = set() if seg is None else {(r, seg.names[e], c.tobytes())
                                         for r, e, c in zip(seg.rowids.tolist(), seg.entities.tolist(), seg.codes)}
    slots = index.slots
    held = np.flatnonzero(slots.live[:slots.used] & (slots.shard[:slots.used] == shard))
    scored = {index.candidates.row(x) for x in held.tolist()}
    if seg is not None:  # each row of the vectors names its memory's live slot
        assert pairs(index, seg.slots) == {(shard, r) for r in seg.rowids.tolist()} and slots.live[seg.slots].all()
    return (*index.lexicon.documents_of(shard), vectors, scored)


def pairs(index: NodeIndex, slots: np.ndarray) -> set[tuple[int, int]]:
    """(shard, rowid) of each of `slots`."""
    return set(zip(index.slots.shard[slots].tolist(), index.slots.rowid[slots].tolist()))


def on_disk(store) -> tuple:
    """The same, read from the shard's file into a fresh lexicon."""
    rows = store.db.execute(_MEMORIES).fetchall()
    fresh = Lexicon()
    fresh.insert(store.shard_id, rows, store.db.execute(_WINDOWS).fetchall())
    codes = quantize(np.frombuffer(b"".join(r[5] for r in rows), dtype=np.float32).reshape(len(rows), -1))[0]
    scored = {tuple(r) for r in store.db.execute(f"SELECT {CANDIDATE_COLUMNS} FROM memories m")}
    return (*fresh.documents_of(store.shard_id), {(r[0], r[1], c.tobytes()) for r, c in zip(rows, codes)}, scored)


def test_a_sync_without_writes_reads_no_shard(make_store, embedder, data):
    """Before every spanning query the index looks for writes; a shard written since is read again,
    the others cost no statement (their connections changed no row)."""
    stores = spread(make_store, data, 3)
    index = NodeIndex(embedder.dimension)
    assert index.sync(stores, stores, 10_000)
    statements: dict[int, list[str]] = {s: [] for s in stores}
    for s, store in stores.items():
        store.db.set_trace_callback(statements[s].append)
    assert index.sync(stores, stores, 10_000)
    assert statements == {s: [] for s in stores}
    first = next(r for r in data if ENTITIES.index(r.entity_id) % 3 == 1)
    stores[1].upsert([MemoryRecord(f"{first.entity_id}::x::new", first.entity_id, "x", 0, 9_000, "conversation",
                                   "a new turn about oboes", (), embedder.encode(["a new turn about oboes"])[0])])
    for found in statements.values():
        found.clear()
    assert index.sync(stores, stores, 10_000)
    assert statements[0] == statements[2] == [] and any("node_index_notes" in sql for sql in statements[1])
    assert contents(index, 1) == on_disk(stores[1])
    for found in statements.values():
        found.clear()
    assert index.sync(stores, stores, 10_000)
    assert statements == {s: [] for s in stores}
    for store in stores.values():
        store.db.set_trace_callback(None)
    index.close()


@pytest.mark.parametrize("renumbering", [False, True])
def test_the_index_follows_every_write(make_store, embedder, data, monkeypatch, renumbering):
    """The index holds what the shards hold after every kind of write; with `renumbering`, its slots
    are numbered again at every write (node/node_slots.py), and every part follows."""
    if renumbering:
        monkeypatch.setattr(node.node_slots.Slots, "due", lambda slots: slots.dead > 0)
    stores = spread(make_store, data, 3)
    index = NodeIndex(embedder.dimension)
    assert index.sync(stores, stores, 10_000)
    s0, s1 = stores[0], stores[1]

    def check():
        assert index.sync(stores, stores, 10_000)
        for s, store in stores.items():
            assert contents(index, s) == on_disk(store), s
        assert index.rows == sum(store.entity_count(None) for store in stores.values())
        scanned = set().union(*(pairs(index, b.slots) for b in index.vectors.blocks(list(stores)).values()))
        assert scanned == {(s, r) for s in stores for r in index.vectors.segments[s].rowids.tolist()}
        assert index.candidates.held == index.rows  # a dead slot's exact vector is let go at once
        if renumbering:
            assert index.slots.dead == 0

    check()
    assert {store.db.execute("PRAGMA temp_store").fetchone()[0] for store in stores.values()} == {2}  # notes in memory
    loads = index.loads
    # A turn in the middle of a session: its neighbours' windows change too.
    first = next(r for r in data if ENTITIES.index(r.entity_id) % 3 == 0)
    vector = embedder.encode(["a new turn about saxophones"])[0]
    s0.upsert([MemoryRecord(f"{first.entity_id}::{first.session_id}::new", first.entity_id, first.session_id,
                            first.turn_index, 5_000, "conversation", "a new turn about saxophones", (), vector)])
    check()
    # The same id written again with other words and a fact (scoring reads whether it states one),
    # then again without it; a delete; an erase.
    s0.upsert([MemoryRecord(first.memory_id, first.entity_id, first.session_id, first.turn_index, 5_001,
                            "conversation", "rewritten about violins", (), vector, fact_key="instrument")])
    check()
    assert any(row[5] for row in contents(index, 0)[3])
    s0.upsert([MemoryRecord(first.memory_id, first.entity_id, first.session_id, first.turn_index, 5_001,
                            "conversation", "rewritten about violins", (), vector)])
    assert s1.delete(next(r.memory_id for r in data if ENTITIES.index(r.entity_id) % 3 == 1))
    check()
    erased = ENTITIES[2]
    assert stores[2].erase(erased)["memories"] > 0
    check()
    assert not [r for r in contents(index, 2)[2] if r[1] == erased] and contents(index, 2)[0]
    assert index.loads == loads  # all of that was read row by row, not by loading shards again
    # Indexing the vectors (an UPDATE of `indexed`) changes no text: nothing to read again.
    refreshed = index.refreshed
    for store in stores.values():
        store.index_pending()
    check()
    assert index.refreshed == refreshed
    # A shard held through another store (a copy that arrived) is loaded again; one not held, dropped.
    stores[1] = make_store(shard_id=1, root=s1.root.parent / "shard-1-copy")
    stores[1].upsert(data[:3])
    del stores[2]
    check()
    assert contents(index, 2) == ({}, {}, set(), set())


def test_a_node_over_the_budget_is_told(make_store, embedder, data):
    stores = spread(make_store, data, 4)
    index = NodeIndex(embedder.dimension)
    assert not index.sync(stores, stores, max_rows=100)  # 60 a shard: one fits
    assert index.rows <= 100
    assert index.sync({0: stores[0]}, stores, max_rows=100)
    # A node that fits loads a bounded share per call (one shard at least), so no query waits for all.
    index = NodeIndex(embedder.dimension)
    for calls in range(1, 5):
        done = index.sync(stores, stores, max_rows=10_000, load_rows=100)
        assert index.loads == calls and done == (calls == 4)
        assert (index.lexicon.logged == 0) == done  # merged once all are in: queries read no log
    assert index.rows == len(data)


def sealed(index: NodeIndex, shards: list[int]) -> None:
    """Every block of `shards` scanned as 4-bit codes from now on (SEAL_AFTER_S patched to 0)."""
    index.vectors.blocks(shards)  # starts the builds
    index.vectors.settle()
    index.vectors.blocks(shards)  # takes them
    assert index.vectors.sealed_rows == sum(len(index.vectors.segments[s].rowids) for s in shards)


@pytest.mark.parametrize("four_bits", [False, True])
def test_the_scan_proposes_the_exact_nearest(make_store, embedder, data, monkeypatch, four_bits):
    """Twice the pool proposed from the codes (8-bit, or 4-bit once a block is still) holds the exact
    nearest `pool`, for embeddings and for random unit vectors; so a search over the codes finds
    every hit the exact scan finds, or better."""
    monkeypatch.setattr(node.node_vectors, "SEAL_AFTER_S", 0.0 if four_bits else 1e9)
    stores = spread(make_store, data, 4)
    index = NodeIndex(embedder.dimension)
    assert index.sync(stores, stores, 10_000)
    if four_bits:
        sealed(index, list(stores))
    rng = np.random.default_rng(5)
    matrix = np.stack([r.vector for r in data])
    rowid_of = {r["memory_id"]: (s, r["rowid"]) for s, store in stores.items()
                for r in store.db.execute("SELECT rowid, memory_id FROM memories")}
    keys = [rowid_of[r.memory_id] for r in data]
    queries = list(embedder.encode(QUERIES)) + list(rng.standard_normal((20, matrix.shape[1])).astype(np.float32))
    for q in queries:
        q = q / np.linalg.norm(q)
        exact = {keys[i] for i in np.argsort(-(matrix @ q))[:32]}
        proposed = pairs(index, index.vectors.nearest(q, list(stores), 64, Scope()))
        assert len(proposed) == 64 and exact <= proposed
    # random unit vectors in many rows: the hardest case for an approximation
    big = make_store(shard_id=7)
    vectors = rng.standard_normal((3000, matrix.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    big.upsert([MemoryRecord(f"r::s::{i}", "r", "s", i, i, None, f"row {i}", (), v) for i, v in enumerate(vectors)])
    index.sync({7: big}, {**stores, 7: big}, 10_000)
    if four_bits:
        sealed(index, [7])
    for q in vectors[:20] + 0.3 * rng.standard_normal((20, matrix.shape[1])).astype(np.float32):
        q = q / np.linalg.norm(q)
        exact = set((np.argsort(-(vectors @ q))[:64] + 1).tolist())  # rowids start at 1
        assert exact <= {r for _, r in pairs(index, index.vectors.nearest(q, [7], 128, Scope()))}
    assert index.sync(stores, stores, 10_000) and index.shards == set(stores)  # 7 is not held any more: dropped
    if four_bits:
        sealed(index, list(stores))
    monkeypatch.setattr(node.spanning_search, "NODE_EXACT_SCAN", 0)

    def per_shard_scan(*args):  # what prefix-scoped queries did: each shard's vectors from SQLite (20x slower)
        raise AssertionError("a query over more than NODE_EXACT_SCAN memories scanned shard by shard")

    monkeypatch.setattr(node.spanning_search, "_exact_dense", per_shard_scan)
    whole = make_store(shard_id=99)
    whole.upsert(data)
    scopes = [(None, None), (None, ("user-1", "user-6")), ((1_040, 1_180), ("user-2",)), ((1_100, None), None)]
    for text, q in zip(QUERIES, embedder.encode(QUERIES)):
        for window, prefixes in scopes:  # the codes' scan filters the window and the prefixes itself
            alone = whole.search(q, text, None, 10, window, prefixes)
            spanning = search_shards(index, stores, q, text, 10, window, prefixes)
            assert len(spanning) == len(alone) == 10, (window, prefixes)
            assert all(window is None or window[0] <= h["created_at_ms"] <= (window[1] or h["created_at_ms"])
                       for h in spanning)
            assert all(prefixes is None or h["entity_id"].startswith(prefixes) for h in spanning)
            assert all(a["similarity"] >= b["similarity"] - 1e-6 for a, b in zip(spanning, alone)), (text, window)


def test_a_write_scans_its_block_at_8_bits_until_it_is_still_again(make_store, embedder, data, monkeypatch):
    """A block written to goes back to the 8-bit scan; the others keep their 4-bit one, and a scan of
    both kinds proposes the nearest of all."""
    monkeypatch.setattr(node.node_vectors, "SEAL_AFTER_S", 0.0)
    monkeypatch.setattr(node.node_vectors, "BLOCK_ROWS", 1)  # a block a shard
    stores = spread(make_store, data, 2)
    index = NodeIndex(embedder.dimension)
    assert index.sync(stores, stores, 10_000)
    sealed(index, list(stores))
    q = embedder.encode(["a new turn about saxophones"])[0]
    first = data[0]
    shard = next(s for s, store in stores.items() if store.entity_count(first.entity_id))
    stores[shard].upsert([MemoryRecord(f"{first.entity_id}::x::new", first.entity_id, "x", 0, 9_000,
                                       "conversation", "a new turn about saxophones", (), q)])
    assert index.sync(stores, stores, 10_000)
    monkeypatch.setattr(node.node_vectors, "SEAL_AFTER_S", 1e9)
    found = pairs(index, index.vectors.nearest(q, list(stores), 8, Scope()))  # the new row: by the 8-bit scan
    assert 0 < index.vectors.sealed_rows == index.memories(1 - shard) < index.rows
    new_rowid = stores[shard].db.execute("SELECT rowid FROM memories WHERE memory_id = ?",
                                         (f"{first.entity_id}::x::new",)).fetchone()[0]
    assert (shard, new_rowid) in found
    rows = [(s, r, np.frombuffer(v, dtype=np.float32)) for s, store in stores.items()
            for r, v in store.db.execute("SELECT rowid, vector FROM memories")]
    exact = {(s, r) for s, r, _ in sorted(rows, key=lambda row: -float(row[2] @ q))[:4]}
    assert exact <= found
    monkeypatch.setattr(node.node_vectors, "SEAL_AFTER_S", 0.0)
    sealed(index, list(stores))  # and by the 4-bit scan once the block is still again
    assert (shard, new_rowid) in pairs(index, index.vectors.nearest(q, list(stores), 8, Scope()))
    index.close()


def test_the_4_bit_model_is_one_matmul_nbits():
    onnx = pytest.importorskip("onnx")
    rng = np.random.default_rng(1)
    codes, scales = quantize(rng.standard_normal((100, 256)).astype(np.float32))
    assert group_for(256) == 128 and group_for(384) == 128 and group_for(96) == 32 and group_for(100) is None
    packed, group_scales = pack(codes, scales, 128)
    model = onnx.load_from_string(model_bytes(100, 256, 128, packed, group_scales))
    onnx.checker.check_model(model)
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("MatMulNBits", "com.microsoft")]
    assert {a.name: a.i for a in model.graph.node[0].attribute} == {
        "K": 256, "N": 100, "bits": 4, "block_size": 128, "accuracy_level": 4}
    assert [i.name for i in model.graph.input] == ["query"] and [i.name for i in model.graph.initializer] == [
        "codes", "scales"]
    # and it scores as the codes say: (code - 8) * scale, summed
    q = rng.standard_normal(256).astype(np.float32)
    fours = np.stack([packed & 15, packed >> 4], axis=-1).reshape(100, 2, 128).astype(np.float32) - 8
    expected = (fours * group_scales.reshape(100, 2, 1)).reshape(100, 256) @ q
    # (the query is cut to 8 bits a block too: accuracy_level 4)
    np.testing.assert_allclose(FourBitScan(codes, scales).scores(q), expected, atol=0.01 * np.abs(expected).max())


def test_the_scoring_model_is_one_matmul_integer():
    onnx = pytest.importorskip("onnx")
    model = onnx.load_from_string(SCORES_MODEL)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMulInteger"]
    assert [i.name for i in model.graph.input] == ["codes", "query", "zero"]


def test_a_short_rest_of_shards_joins_the_last_block(monkeypatch):
    """Shards are cut into blocks of at least BLOCK_ROWS rows, scanned a call each; what is left
    under half a block joins the last one rather than costing a call of its own."""
    monkeypatch.setattr(node.node_vectors, "BLOCK_ROWS", 100)
    vectors = node.node_vectors.NodeVectors(8)
    rng = np.random.default_rng(2)
    for shard in range(11):
        rows = [(r, "e", 0, rng.standard_normal(8).astype(np.float32).tobytes()) for r in range(30)]
        vectors.put(shard, rows, np.arange(30 * shard, 30 * shard + 30))
    assert [len(b.rowids) for b in vectors.blocks(list(range(9))).values()] == [120, 150]  # 30 rows left: joined
    assert [len(b.rowids) for b in vectors.blocks(list(range(11))).values()] == [120, 120, 90]  # 90: a block
    assert sorted(np.concatenate([b.slots for b in vectors.blocks(list(range(11))).values()]).tolist()) == \
        list(range(330))
    vectors.close()
