"""The node's inverted index (node/lexicon.py) scores as FTS5 does: the same BM25 as a shard's own
full-text tables for every row, and still after merges, deletes and renumbering. Real SQLite."""

from __future__ import annotations

import random

import numpy as np
import pytest

import node.lexicon
import node.node_slots
from loadtest.texts import sentence
from node.lexicon import TABLES, Lexicon
from node.node_index import _MEMORIES, _WINDOWS
from node.ranking import fts_match_expression
from node.store import MemoryRecord
from node.store.schema import LEXICAL_SOURCES
from node.store.scope import Scope

QUERIES = ["garden tomatoes in the morning", "train tickets to the coast", "what did she cook for dinner",
           "music", "the", "snake_case words", "zzzz nothing matches this"]


@pytest.fixture
def store(make_store):
    """240 memories of 8 entities (3 sessions of 10 turns each), texts over a Zipf vocabulary."""
    rng = random.Random(5)
    vectors = np.random.default_rng(5).standard_normal((240, 384)).astype(np.float32)
    store = make_store(shard_id=3)
    store.upsert([MemoryRecord(f"user-{i % 8}::s{i // 8 % 3}::{i // 24}", f"user-{i % 8}", f"s{i // 8 % 3}", i // 24,
                               1_000 + i, "conversation", sentence(rng, i), (), vectors[i]) for i in range(240)])
    return store


def loaded(store, batch: int = 240) -> Lexicon:
    lexicon = Lexicon()
    memories = store.db.execute(_MEMORIES).fetchall()
    windows = {r[0]: r for r in store.db.execute(_WINDOWS).fetchall()}
    for i in range(0, len(memories), batch):
        part = memories[i:i + batch]
        lexicon.insert(store.shard_id, part, [windows[r[0]] for r in part if r[0] in windows])
    return lexicon


def fts5(store, table: int, text: str) -> dict[int, float]:
    """The shard's own BM25 of every matching row, as node/store/search.py asks for it."""
    name, column = LEXICAL_SOURCES[table]
    return {r: -v for r, v in store.db.execute(
        f"SELECT rowid, bm25({name}, 0.0, 1.0) FROM {name} WHERE {name} MATCH ?",
        (f"{column} : ({fts_match_expression(text)})",))}


def ours(lexicon: Lexicon, shard: int, table: int, text: str) -> dict[int, float]:
    phrases = lexicon.phrases(text)
    scores = lexicon.scores(table, phrases, Scope(None), None)
    return {int(lexicon.slots.rowid[s]): float(scores[s]) for s in np.flatnonzero(scores > 0)
            if lexicon.slots.shard[s] == shard}


@pytest.mark.parametrize("text", QUERIES)
def test_bm25_of_every_row_is_fts5s(store, text):
    lexicon = loaded(store)
    for table in range(len(TABLES)):
        expected, got = fts5(store, table, text), ours(lexicon, store.shard_id, table, text)
        if "_" in text:  # FTS5 reads `snake_case` as a phrase of two tokens; the lexicon as two words
            assert set(expected) <= set(got)
            continue
        assert got.keys() == expected.keys(), (text, TABLES[table])
        assert all(got[r] == pytest.approx(v, rel=1e-9) for r, v in expected.items()), (text, TABLES[table])


def test_scores_hold_through_merges_deletes_and_renumbering(store, monkeypatch):
    """Small batches past a small merge threshold fold the log in again and again; erasing five of
    eight entities kills more slots than live ones, so slots, words and names are numbered again:
    the scores are then a fresh lexicon's of what is left, and the erased names are gone."""
    monkeypatch.setattr(node.lexicon, "LOG_MERGE", 50)
    monkeypatch.setattr(node.node_slots, "RENUMBER_AFTER", 50)
    lexicon = loaded(store, batch=17)
    assert all(len(p.slots) for p in lexicon.postings)  # logs were merged into the sorted part
    erased = {f"user-{i}" for i in range(5)}
    gone = [r[0] for r in store.db.execute(_MEMORIES).fetchall() if r[1] in erased]
    lexicon.delete(store.shard_id, gone)
    assert lexicon.slots.used == 240 - len(gone) and not erased & set(lexicon.slots.names)  # renumbered
    for r in gone:
        store.db.execute("DELETE FROM memories WHERE rowid = ?", (r,))
    fresh = loaded(store)
    for text in QUERIES:
        for table in range(len(TABLES)):
            assert ours(lexicon, store.shard_id, table, text) == pytest.approx(ours(fresh, store.shard_id, table, text))


def test_scope_and_shards_mask_the_scores(store):
    lexicon = loaded(store)
    other = Lexicon()
    memories = store.db.execute(_MEMORIES).fetchall()
    lexicon.insert(7, memories, store.db.execute(_WINDOWS).fetchall())  # the same rows again, as shard 7
    phrases = lexicon.phrases("garden tomatoes music")
    every = lexicon.scores(0, phrases, Scope(None), None)
    assert (every > 0).any()
    only_7 = lexicon.scores(0, phrases, Scope(None), {7})
    assert set(lexicon.slots.shard[np.flatnonzero(only_7 > 0)].tolist()) == {7}
    scoped = lexicon.scores(0, phrases, Scope.of(None, (1_100, 1_150), ("user-1",)), None)
    kept = np.flatnonzero(scoped > 0)
    slots = lexicon.slots
    assert len(kept) and all(slots.names[slots.entity[s]] == "user-1" and 1_100 <= slots.created_at_ms[s] <= 1_150
                             for s in kept.tolist())
    assert np.array_equal(scoped[kept], every[kept])  # masked, not scored again
    assert other.scores(0, phrases, Scope(None), None).size == 0


def test_query_terms_are_cut_as_fts5_cuts_them_one_by_one():
    """Terms cut in one round trip, some cut before, come back as each alone would: in order, a term
    FTS5 splits (snake_case) as its words, a stemmed one stemmed."""
    alone = {t: node.lexicon.Tokenizer().words([t])[0] for t in ("running", "snake_case", "gardens", "the")}
    assert alone["snake_case"] == ("snake", "case") and alone["running"] == ("run",)
    tokenizer = node.lexicon.Tokenizer()
    assert tokenizer.words(["running", "snake_case"]) == [alone["running"], alone["snake_case"]]
    assert tokenizer.words(["snake_case", "gardens", "the", "running", "gardens"]) == [
        alone["snake_case"], alone["gardens"], alone["the"], alone["running"], alone["gardens"]]
    assert tokenizer.db.execute("SELECT count(*) FROM scratch").fetchone() == (0,)


def test_cutting_query_terms_leaves_fts5_nothing_to_read_later():
    """Every query's new words go through the scratch table and leave nothing there, not even
    what FTS5 keeps of deleted rows (each call would read more)."""
    tokenizer = node.lexicon.Tokenizer()
    before = tokenizer.db.execute("SELECT count(*) FROM scratch_data").fetchone()
    for i in range(50):
        tokenizer.words([f"word{i}", f"other{i}"])
    assert tokenizer.db.execute("SELECT count(*) FROM scratch_data").fetchone() == before
