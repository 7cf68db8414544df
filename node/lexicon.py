"""One full-text index over a node's shards: the lexical half of its node index (node/node_index.py).

A query without an entity used to run two FTS5 MATCH evaluations in every shard the node holds,
then two over one in-memory FTS5 copy of all of them; FTS5 computes BM25 for every row that
matches (about 1.2 us each, thousands of rows for a few common words), which was the largest share
of such a query (docs/benchmarks.md, "An inverted index in NumPy"). Here the same two documents per
memory as the shards' FTS tables (its text, and its turn window: node/store/windows.py) are held as
posting arrays, and a query's BM25 over every matching row is a few array operations per word.

Everything that decides a score is FTS5's own, so a node of one shard scores as that shard
(tests/test_node_index.py):
  - words are cut and stemmed by FTS5 itself: a whole shard's are read from its own FTS5 tables
    through `fts5vocab` (`load`), and rows written later go through a scratch FTS5 table with the
    shards' tokenizer and come back the same way (`insert`);
  - BM25 is `bm25(table, 0.0, 1.0)` of node/store/search.py: a word counts in the text column
    only, the length of a row counts the entity token too, k1 = 1.2, b = 0.75, and an idf at or
    below zero becomes 1e-6, over the node's rows (the idf of a word is the node's).
One difference: a query word that FTS5 cuts in two (`snake_case`) is a phrase to FTS5 (the two
tokens next to each other); here its tokens count as words of their own.

Memories are slots (node/node_slots.py, shared with the rest of the node index), and each table's
postings list (slot, count) per word: a sorted part (CSR by word) and a log of recent additions
merged in when it grows, and once the node index has loaded all its shards (`merge`: each word of
a query is looked for in the whole log, 0.12 ms a query with 22,000 postings logged). A memory
deleted or read again leaves a dead slot, skipped; when the dead outnumber the live, the slots and
the words are numbered again, so what an erase removed leaves the index then (it is in memory only,
never on disk).
"""

from __future__ import annotations

import math
import sqlite3
from typing import NamedTuple

import numpy as np

from node.lru import LRU
from node.node_slots import Slots, key
from node.ranking import query_terms
from node.store.scope import Scope

TABLES = ("turns", "windows")  # as the shards' memories_fts and windows_fts
TOKENIZER = "porter unicode61 remove_diacritics 2"  # the shards' (node/store/schema.py)
K1, B = 1.2, 0.75  # FTS5's bm25 constants
LOG_MERGE = 65_536  # postings added since the last merge before the log is merged in (or 1/8 of the rest)


class Postings:
    """One table's inverted index: word id -> the slots holding it and how often."""

    def __init__(self) -> None:
        self.starts = np.zeros(1, dtype=np.int64)  # word w's postings: starts[w]:starts[w + 1]
        self.slots = np.empty(0, dtype=np.int32)
        self.counts = np.empty(0, dtype=np.int32)
        self._log: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (words, slots, counts) added since
        self._logged = 0
        self._joined: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.slots.nbytes + self.counts.nbytes + 12 * self._logged

    @property
    def logged(self) -> int:
        return self._logged

    def add(self, words: np.ndarray, slots: np.ndarray, counts: np.ndarray, live: np.ndarray, vocabulary: int) -> None:
        self._log.append((words, slots, counts))
        self._logged += len(words)
        self._joined = None
        if self._logged > max(LOG_MERGE, len(self.slots) // 8):
            self.merge(live, vocabulary)

    def get(self, word: int) -> tuple[np.ndarray, np.ndarray]:
        """(slots, counts) of a word, dead slots included."""
        slots = counts = np.empty(0, dtype=np.int32)
        if word + 1 < len(self.starts):
            a, b = self.starts[word], self.starts[word + 1]
            slots, counts = self.slots[a:b], self.counts[a:b]
        if self._log:
            if self._joined is None:
                self._joined = tuple(np.concatenate(part) for part in zip(*self._log))  # type: ignore[assignment]
            words, logged, logged_counts = self._joined
            mine = words == word
            if mine.any():
                slots, counts = np.concatenate([slots, logged[mine]]), np.concatenate([counts, logged_counts[mine]])
        return slots, counts

    def merge(self, live: np.ndarray, vocabulary: int, renumber: np.ndarray | None = None,
              words_renumbered: np.ndarray | None = None) -> None:
        """The log into the sorted part, dead slots dropped; `renumber` (old slot -> new) and
        `words_renumbered` (old word -> new, -1: gone) when slots and words are numbered again."""
        words = np.repeat(np.arange(len(self.starts) - 1, dtype=np.int32), np.diff(self.starts))
        parts = [(words, self.slots, self.counts), *self._log]
        words, slots, counts = (np.concatenate(p) for p in zip(*parts))
        keep = live[slots]
        words, slots, counts = words[keep], slots[keep], counts[keep]
        if renumber is not None:
            slots = renumber[slots]
        if words_renumbered is not None:
            words = words_renumbered[words]
        order = np.argsort(words, kind="stable")
        self.slots, self.counts = slots[order].astype(np.int32), counts[order]
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(words, minlength=vocabulary))]).astype(np.int64)
        self._log, self._logged, self._joined = [], 0, None


class Tokenizer:
    """FTS5's own cutting and stemming, through scratch tables read back with `fts5vocab`."""

    def __init__(self) -> None:
        self.db = _scratch()  # query terms': a query's at a time, so deletes leave little behind
        self._cut: LRU[str, tuple[str, ...]] = LRU(4096)  # the words of terms cut before

    def documents(self, docs: list[tuple[int, str, str]]) -> Batch:
        """The postings of (slot, entity token, text) documents."""
        db = _scratch()  # a batch's own: what a delete leaves in an FTS5 index slows its next reads
        try:
            db.executemany("INSERT INTO scratch(rowid, entity_token, text) VALUES (?, ?, ?)", docs)
            found = db.execute("SELECT term, doc, count(*) FROM scratch_words WHERE col = 'text' "
                               "GROUP BY term, doc").fetchall()
            lengths = db.execute("SELECT doc, count(*) FROM scratch_words GROUP BY doc").fetchall()
        finally:
            db.close()
        return Batch.read(found, lengths)

    def words(self, terms: list[str]) -> list[tuple[str, ...]]:
        """The tokens FTS5 makes of each query term, in order; the terms not cut before are cut in one
        round trip (a statement per term cost 0.1 ms each), in a transaction rolled back, so the
        scratch table stays empty (deleting the rows again left FTS5 more to read at every call)."""
        missing = [t for t in dict.fromkeys(terms) if t not in self._cut]
        if missing:
            cut: dict[int, list[str]] = {i: [] for i in range(1, len(missing) + 1)}
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT INTO scratch(rowid, entity_token, text) VALUES (?, '', ?)",
                                    enumerate(missing, 1))
                for doc, word in self.db.execute(
                        "SELECT doc, term FROM scratch_words WHERE col = 'text' ORDER BY doc, offset"):
                    cut[doc].append(word)
            finally:
                self.db.execute("ROLLBACK")
            for i, term in enumerate(missing, 1):
                self._cut.put(term, tuple(cut[i]))
        return [self._cut.get(t) or () for t in terms]


def _scratch() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    db.execute(f"CREATE VIRTUAL TABLE scratch USING fts5(entity_token, text, tokenize='{TOKENIZER}')")
    db.execute("CREATE VIRTUAL TABLE scratch_words USING fts5vocab(scratch, 'instance')")
    return db


class Batch(NamedTuple):
    """Documents' postings, as `fts5vocab` reads them: the word, document and count in the text of
    each (word, document) pair, and each document's length in tokens (both columns, as FTS5's bm25
    counts it). A document is a slot, or a shard's rowid before `Lexicon.load` finds its slot."""

    words: list[str]
    docs: np.ndarray
    counts: np.ndarray
    documents: np.ndarray
    lengths: np.ndarray

    @classmethod
    def read(cls, found: list, lengths: list) -> Batch:
        """From rows (word, document, count) and (document, length)."""
        return cls([r[0] for r in found], np.fromiter((r[1] for r in found), dtype=np.int64, count=len(found)),
                   np.fromiter((r[2] for r in found), dtype=np.int32, count=len(found)),
                   np.fromiter((r[0] for r in lengths), dtype=np.int64, count=len(lengths)),
                   np.fromiter((r[1] for r in lengths), dtype=np.int32, count=len(lengths)))


class Lexicon:
    def __init__(self, slots: Slots | None = None) -> None:
        """Over `slots` (node/node_slots.py), shared with the index's other parts; its own without."""
        self.tokenizer = Tokenizer()
        self.slots = slots if slots is not None else Slots()
        for table in TABLES:
            self.slots.add(f"{table}_length", np.int32)  # 0: no such document
        self.documents = [0 for _ in TABLES]  # live documents of each table
        self.tokens = [0 for _ in TABLES]  # and their tokens
        self.words: dict[str, int] = {}
        self.postings = [Postings() for _ in TABLES]

    @property
    def lengths(self) -> list[np.ndarray]:
        """Each table's document length (in tokens) of every slot."""
        return [self.slots.columns[f"{table}_length"] for table in TABLES]

    @property
    def nbytes(self) -> int:
        """The postings, the lengths and the slots' own columns."""
        return self.slots.nbytes + sum(c.nbytes for c in self.lengths) + sum(p.nbytes for p in self.postings)

    def insert(self, shard: int, memories: list, windows: list) -> np.ndarray:
        """Add (or replace) a shard's memories, (rowid, entity_id, created_at_ms, entity_token, text, ...)
        each, and their window documents, (rowid, entity_token, window text) each; their slots."""
        placed = self._place(shard, memories)
        slots = placed.tolist()
        first = slots[0] if slots else self.slots.used
        fresh = [self.slots.slot_of.get(key(shard, r[0]), -1) for r in windows]
        for t, docs in enumerate(([(slot, r[3], r[4]) for slot, r in zip(slots, memories)],
                                  [(slot, r[1], r[2]) for slot, r in zip(fresh, windows) if slot >= first])):
            if docs:
                self._index(t, self.tokenizer.documents(docs))
        return placed

    def load(self, shard: int, memories: list, indexed: list[tuple[list, list]]) -> np.ndarray:
        """A whole shard's memories (as `insert` takes them) with each table's words as the shard's
        own FTS5 index holds them, read by the caller through `fts5vocab`: (word, rowid, count in
        the text) and (rowid, length) rows. The same postings as `insert` (the same tokenizer cut
        them: tests/test_node_index.py), without cutting every text again. Their slots."""
        slots = self._place(shard, memories)
        rowids = self.slots.rowid[slots]
        for t, (found, lengths) in enumerate(indexed):
            batch = Batch.read(found, lengths)
            docs, documents = _lookup(rowids, slots, batch.docs), _lookup(rowids, slots, batch.documents)
            kept, held = docs >= 0, documents >= 0  # a row of the FTS index and not of `memories`: none should be
            self._index(t, Batch([w for w, k in zip(batch.words, kept.tolist()) if k], docs[kept], batch.counts[kept],
                                 documents[held], batch.lengths[held]))
        return slots

    def _place(self, shard: int, memories: list) -> np.ndarray:
        """New slots for `memories` (the old ones of the same rowids die)."""
        self.delete(shard, [r[0] for r in memories])
        return self.slots.place(shard, memories)

    def delete(self, shard: int, rowids: list[int]) -> None:
        self._kill(self.slots.take(shard, rowids))

    def delete_shard(self, shard: int) -> None:
        self._kill(self.slots.take_shard(shard))

    @property
    def logged(self) -> int:
        """Postings in the tables' logs, not merged yet."""
        return sum(p.logged for p in self.postings)

    def merge(self) -> None:
        """Each table's log into its sorted part (35 ms for 750,000 postings a table)."""
        for postings in self.postings:
            if postings.logged:
                postings.merge(self.slots.live, len(self.words))

    def phrases(self, text: str) -> list[int] | None:
        """The word ids of a query's terms (node.ranking.query_terms: stopwords out), as FTS5 cuts
        them; -1 for a word no document here holds. None: the query has no term."""
        terms = query_terms(text)
        if not terms:
            return None
        return [self.words.get(w, -1) for cut in self.tokenizer.words(terms) for w in cut]

    def scores(self, table: int, phrases: list[int], scope: Scope, shards: set[int] | None) -> np.ndarray:
        """BM25 (positive; 0: no match) of every slot for the query's words, over the node's rows of
        `table`; slots outside `scope` (its window and prefixes) and `shards` (None: all) are 0."""
        out = np.zeros(self.slots.used, dtype=np.float64)
        n = self.documents[table]
        if not n:
            return out
        average = self.tokens[table] / n
        lengths, live = self.lengths[table], self.slots.live
        for word in phrases:
            if word < 0:
                continue
            slots, counts = self.postings[table].get(word)
            alive = live[slots]
            slots, counts = slots[alive], counts[alive].astype(np.float64)
            if not len(slots):
                continue
            idf = math.log((n - len(slots) + 0.5) / (len(slots) + 0.5))
            idf = idf if idf > 0 else 1e-6
            out[slots] += idf * (counts * (K1 + 1.0)) / (counts + K1 * (1 - B + B * lengths[slots] / average))
        inside = self.slots.admitted(scope.any_entity(), shards)
        if inside is not None:
            out[~inside] = 0.0
        return out

    def best(self, scores: np.ndarray, k: int) -> np.ndarray:
        """The slots of the `k` best-scored that match, best first."""
        matched = np.flatnonzero(scores > 0)
        if len(matched) > k:
            matched = matched[np.argpartition(-scores[matched], k - 1)[:k]]
        return matched[np.argsort(-scores[matched], kind="stable")]

    def documents_of(self, shard: int) -> tuple[dict[int, tuple[int, dict[str, int]]], ...]:
        """Each table's documents of a shard: rowid -> (length, {word: count}); what tests compare."""
        names = {i: w for w, i in self.words.items()}
        live, shards, rowids, used = self.slots.live, self.slots.shard, self.slots.rowid, self.slots.used
        out: tuple[dict, ...] = ({}, {})
        for t, postings in enumerate(self.postings):
            lengths = self.lengths[t]
            for word in range(len(names)):
                slots, counts = postings.get(word)
                for slot, count in zip(slots.tolist(), counts.tolist()):
                    if live[slot] and shards[slot] == shard:
                        out[t].setdefault(int(rowids[slot]), (int(lengths[slot]), {}))[1][names[word]] = count
            for slot in np.flatnonzero(live[:used] & (shards[:used] == shard)).tolist():
                if lengths[slot]:
                    out[t].setdefault(int(rowids[slot]), (int(lengths[slot]), {}))
        return out

    def _index(self, table: int, batch: Batch) -> None:
        """A batch's postings and document lengths into `table`."""
        self.lengths[table][batch.documents] = batch.lengths
        self.documents[table] += len(batch.documents)
        self.tokens[table] += int(batch.lengths.sum())
        ids = np.fromiter((self.words.setdefault(w, len(self.words)) for w in batch.words), dtype=np.int32,
                          count=len(batch.words))
        self.postings[table].add(ids, batch.docs.astype(np.int32), batch.counts, self.slots.live, len(self.words))

    def _kill(self, slots: list[int]) -> None:
        """Slots taken from `self.slots` (their memories gone or read again) die, and leave the counts."""
        if not slots:
            return
        index = np.asarray(slots, dtype=np.int64)
        for t, lengths in enumerate(self.lengths):
            self.documents[t] -= int(np.count_nonzero(lengths[index]))
            self.tokens[t] -= int(lengths[index].sum())
            lengths[index] = 0
        self.slots.kill(slots)
        if self.slots.due():
            self._renumber()

    def _renumber(self) -> None:
        """Slots and words numbered again over the live memories: the dead leave the index."""
        live = self.slots.live
        held = np.zeros(len(self.words), dtype=bool)
        for postings in self.postings:
            postings.merge(live, len(self.words))
            held |= np.diff(postings.starts) > 0
        words_renumbered = np.where(held, np.cumsum(held) - 1, -1).astype(np.int32)
        self.words = {w: int(words_renumbered[i]) for w, i in self.words.items() if held[i]}
        numbering = self.slots.numbering()
        for postings in self.postings:
            postings.merge(live, len(self.words), numbering, words_renumbered)
        self.slots.renumber(numbering)


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[i] for the i with keys[i] == each of `wanted` (keys distinct), -1 where there is none."""
    if not len(keys):
        return np.full(len(wanted), -1, dtype=np.int64)
    order = np.argsort(keys)
    at = order[np.minimum(np.searchsorted(keys, wanted, sorter=order), len(keys) - 1)]
    return np.where(keys[at] == wanted, values[at], -1)

