"""A node's vectors as 8-bit codes, scanned with ONNX Runtime, to propose a spanning query's nearest.

A query without an entity looks for the nearest memories among all of a node's. An exact scan of
their float32 vectors reads 1.5 KB a memory per query, which is memory bandwidth: 3.3 ms for 52,000
memories in one matrix on this machine, 5.5 ms in 32 shards' matrices. Here each vector is kept as
8-bit codes with a scale of its own (v ~ scale * code, code in -127..127, stored +128 as uint8), a
quarter of the bytes, and scanned with ONNX Runtime's MatMulInteger (uint8 x int8 -> int32, its
integer kernels): 1.0 ms for the same 52,000, 1.3 ms as 32 shards' segments (docs/benchmarks.md).

A block (consecutive shards' segments, about BLOCK_ROWS rows) that has not changed for SEAL_AFTER_S
also gets 4-bit codes, a scale per 128 coordinates, in an ONNX Runtime session of its own
(node/four_bit_scan.py), built on a thread so no query waits for it. Its scan then reads those, half
the bytes, keeps FOUR_BIT_SHORTLIST times the rows asked for, and reads their 8-bit codes again to
propose the best: what the 8-bit scan alone proposes, for about half the memory read after the node
sat idle (docs/benchmarks.md). The 8-bit codes stay: a write to one of the block's shards joins it
again, scanned at 8 bits until it is still again. The session costs about 0.45 KiB a memory
(docs/ops/sizing.md).

The scan only proposes. The caller takes more candidates than it needs (`nearest`: twice the pool)
and scores every candidate on its exact cosine (node/node_rows.py, node/store/search.py), so
quantisation can change which memories come in at the edge of the pool, never a score. On
embeddings and on random unit vectors the exact best 64 were always among the best 128 proposed,
with 8-bit blocks, 4-bit ones and both (tests/test_node_index.py; 50,000 random vectors:
docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from node.four_bit_scan import FourBitScan, group_for
from node.store.scope import Scope, admitted_names

# One MatMulInteger node: scores[rows, 1] = (codes[rows, dim] - zero) @ query[dim, 1] (onnx.helper,
# opset 13, IR 8; tests/test_node_index.py builds it again with the onnx package and compares).
SCORES_MODEL = (
    b'\x08\x08\x12\x07tellodb:\xa4\x01\n+\n\x05codes\n\x05query\n\x04zero\x12\x06scores"\rMatMulInteger\x12\x0b'
    b'int8_scoresZ\x1e\n\x05codes\x12\x15\n\x13\x08\x02\x12\x0f\n\x06\x12\x04rows\n\x05\x12\x03dimZ\x1a\n\x05query'
    b'\x12\x11\n\x0f\x08\x03\x12\x0b\n\x05\x12\x03dim\n\x02\x08\x01Z\x0e\n\x04zero\x12\x06\n\x04\x08\x02\x12\x00b'
    b'\x1c\n\x06scores\x12\x12\n\x10\x08\x06\x12\x0c\n\x06\x12\x04rows\n\x02\x08\x01B\x04\n\x00\x10\r')
ZERO = np.array(128, dtype=np.uint8)
log = logging.getLogger("tellodb")
BLOCK_ROWS = 16384  # rows scanned per ONNX Runtime call, about: small shards' segments are joined up to it
# (a write to a shard joins its block again, 6 MiB at 384 dimensions; 4,096 cost 1.1 ms more a query: docs/benchmarks.md)
SEAL_AFTER_S = 10.0  # a block unchanged this long gets its 4-bit scan (about 40 ms of a thread for 16,384 rows)
FOUR_BIT_SHORTLIST = 3  # a 4-bit scan keeps this many times the rows asked for, read again at 8 bits


class Segment(NamedTuple):
    """One shard's vectors (or consecutive shards', joined in a block): rowids, slots in the node
    index (node/node_slots.py: what a scan proposes), creation times (windows filter on them),
    entities (an entity-id prefix filters on them: an index into `names`), codes and scales."""

    rowids: np.ndarray  # int64
    slots: np.ndarray  # int64
    created_at_ms: np.ndarray  # int64
    entities: np.ndarray  # int32: each row's entity, as its place in `names`
    codes: np.ndarray  # uint8 (rows, dim): code + 128
    scales: np.ndarray  # float32
    names: tuple[str, ...]  # the entity ids the rows' `entities` point into

    @property
    def nbytes(self) -> int:
        return self.rowids.nbytes + self.slots.nbytes + self.created_at_ms.nbytes + self.entities.nbytes + \
            self.codes.nbytes + self.scales.nbytes

    def rows(self, begin: int, end: int) -> Segment:
        """Rows begin..end, as views of this segment's arrays."""
        return Segment(self.rowids[begin:end], self.slots[begin:end], self.created_at_ms[begin:end],
                       self.entities[begin:end], self.codes[begin:end], self.scales[begin:end], self.names)

    def admitted(self, scope: Scope) -> np.ndarray | None:
        """Which rows `scope` (window, entity, prefixes) admits; None: all of them."""
        inside = None if scope.timeless else scope.mask(self.created_at_ms)
        if scope.entity_id is not None or scope.prefixes:
            of_entity = admitted_names(self.names, scope)[self.entities]
            inside = of_entity if inside is None else inside & of_entity
        return inside


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes as uint8 with zero point 128, one float32 scale per row) of float32 `vectors`."""
    scales = np.abs(vectors).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int16) + 128
    return codes.astype(np.uint8), scales.astype(np.float32)


def segment(rows: list, slots: np.ndarray, dimension: int) -> Segment:
    """A segment of `rows`, (rowid, entity_id, created_at_ms, float32 vector bytes) each, at `slots`."""
    matrix = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float32).reshape(len(rows), dimension)
    codes, scales = quantize(matrix)
    names = tuple(sorted({r[1] for r in rows}))
    place = {name: i for i, name in enumerate(names)}
    return Segment(np.array([r[0] for r in rows], dtype=np.int64), np.asarray(slots, dtype=np.int64),
                   np.array([r[2] for r in rows], dtype=np.int64),
                   np.array([place[r[1]] for r in rows], dtype=np.int32), codes, scales, names)


def joined(parts: list[Segment]) -> Segment:
    """One segment of `parts`' rows, in order; each part's entities move past the names before it."""
    offsets = np.cumsum([0] + [len(p.names) for p in parts[:-1]])
    return Segment(np.concatenate([p.rowids for p in parts]), np.concatenate([p.slots for p in parts]),
                   np.concatenate([p.created_at_ms for p in parts]),
                   np.concatenate([p.entities + np.int32(o) for p, o in zip(parts, offsets)]),
                   np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                   tuple(name for p in parts for name in p.names))


def best(slots: list[np.ndarray], scores: list[np.ndarray], k: int) -> np.ndarray:
    """The slots of the `k` best-scored rows of all the parts (each part: slots and their scores)."""
    if not scores:
        return np.empty(0, dtype=np.int64)
    every, of = np.concatenate(scores), np.concatenate(slots)
    return of[np.argpartition(-every, k - 1)[:k]] if len(every) > k else of


class NodeVectors:
    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self.segments: dict[int, Segment] = {}
        self._blocks: dict[tuple[int, ...], Segment] = {}  # joined segments, by their shards
        self._joined_at: dict[tuple[int, ...], float] = {}  # when each block was joined (time.monotonic)
        self._sealed: dict[tuple[int, ...], FourBitScan] = {}  # blocks' 4-bit scans
        self._sealing: dict[tuple[int, ...], Future] = {}  # ... being built
        self._grouping: tuple[tuple[int, ...], list[tuple[int, ...]]] | None = None  # shards -> blocks, until a change
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seal")
        self.four_bits = group_for(dimension) is not None  # whether blocks get 4-bit scans (off after a failed build)
        self._session: ort.InferenceSession | None = None

    @property
    def sealed_rows(self) -> int:
        """Rows scanned as 4-bit codes (in blocks that have their 4-bit scan)."""
        return sum(scan.rows for scan in self._sealed.values())

    @property
    def nbytes(self) -> int:
        """The segments' arrays and what the 4-bit scans hold."""
        return sum(s.nbytes for s in self.segments.values()) + sum(scan.nbytes for scan in self._sealed.values())

    def put(self, shard: int, rows: list, slots: np.ndarray) -> None:
        """A shard's whole segment: `rows` are (rowid, entity_id, created_at_ms, vector bytes), at `slots`."""
        self.segments[shard] = segment(rows, slots, self.dimension)
        self._changed(shard)

    def update(self, shard: int, gone: list[int], rows: list, slots: np.ndarray) -> None:
        """Remove the rows of `gone` from a shard's segment, then add `rows` (as they are now, at `slots`)."""
        old = self.segments[shard]
        keep = ~np.isin(old.rowids, np.asarray(gone, dtype=np.int64))
        used = np.unique(old.entities[keep])  # names no row points to any more (an erase's) are let go
        entities = np.searchsorted(used, old.entities[keep]).astype(np.int32)
        kept = Segment(old.rowids[keep], old.slots[keep], old.created_at_ms[keep], entities, old.codes[keep],
                       old.scales[keep], tuple(old.names[i] for i in used.tolist()))
        self.segments[shard] = joined([kept, segment(rows, slots, self.dimension)]) if rows else kept
        self._changed(shard)

    def renumber(self, numbering: np.ndarray) -> None:
        """The node index numbered its slots again (old slot -> new): every segment's and block's
        slots follow, and the blocks keep their 4-bit scans (node/node_slots.py)."""
        for key, block in self._blocks.items():
            self._blocks[key] = block._replace(slots=numbering[block.slots])
            self._views(key)
        for shard, seg in self.segments.items():
            if not any(shard in key for key in self._blocks):
                self.segments[shard] = seg._replace(slots=numbering[seg.slots])

    def drop(self, shard: int) -> None:
        self.segments.pop(shard, None)
        self._changed(shard)

    def _changed(self, shard: int) -> None:
        self._grouping = None
        for key in [key for key in self._blocks if shard in key]:
            self._let_go(key)

    def _let_go(self, key: tuple[int, ...]) -> None:
        """Forget a block, its 4-bit scan, and one being built (its result is never used)."""
        self._blocks.pop(key, None)
        self._joined_at.pop(key, None)
        self._sealed.pop(key, None)
        building = self._sealing.pop(key, None)
        if building is not None:
            building.cancel()

    def blocks(self, shards: list[int]) -> dict[tuple[int, ...], Segment]:
        """`shards`' segments in blocks of about BLOCK_ROWS rows (a larger segment alone), by their
        shards, joined ones kept until one of their shards changes; blocks of other groupings are
        let go. Blocks unchanged for SEAL_AFTER_S get their 4-bit scan built (`_seal`)."""
        asked = tuple(shards)
        if self._grouping is not None and self._grouping[0] == asked:  # no segment changed since
            groups = self._grouping[1]
        else:
            groups = self._groups(asked)
            self._grouping = (asked, groups)
        for key in [key for key in self._blocks if key not in groups]:
            self._let_go(key)
        blocks = {key: self._blocks.get(key) or self._join(key) for key in groups}
        self._blocks = blocks
        self._seal(blocks)
        return blocks

    def _groups(self, shards: tuple[int, ...]) -> list[tuple[int, ...]]:
        """`shards` in order, cut into groups of at least BLOCK_ROWS rows; the rest joins the last group
        when under half of that (a scan call of its own costs about 0.1 ms after idle)."""
        groups: list[tuple[int, ...]] = []
        group: list[int] = []
        rows = 0
        for shard in sorted(shards):
            group.append(shard)
            rows += len(self.segments[shard].rowids)
            if rows >= BLOCK_ROWS:
                groups.append(tuple(group))
                group, rows = [], 0
        if group and groups and rows < BLOCK_ROWS // 2:
            groups[-1] += tuple(group)
        elif group:
            groups.append(tuple(group))
        return groups

    def _seal(self, blocks: dict[tuple[int, ...], Segment]) -> None:
        """Take the 4-bit scans built since the last call; start one for a block unchanged for SEAL_AFTER_S."""
        for key, building in list(self._sealing.items()):
            if building.done():
                del self._sealing[key]
                if building.exception() is None:
                    self._sealed[key] = building.result()
                elif self.four_bits:  # this ONNX Runtime cannot: the 8-bit scan goes on, no build again
                    log.warning("4-bit scans are off on this node: %r", building.exception())
                    self.four_bits = False
        if not self.four_bits:
            return
        now = time.monotonic()
        for key, block in blocks.items():
            if key not in self._sealed and key not in self._sealing and now - self._joined_at[key] >= SEAL_AFTER_S:
                self._sealing[key] = self._builder.submit(FourBitScan, block.codes, block.scales)

    def settle(self, timeout: float | None = None) -> None:
        """Wait for the 4-bit scans being built (tests, benchmarks); the next query takes them."""
        for building in list(self._sealing.values()):
            try:
                building.result(timeout)
            except Exception:
                pass

    def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)

    def _join(self, shards: tuple[int, ...]) -> Segment:
        """A block of `shards`' segments; each segment becomes a view of it, so rows are held once."""
        self._blocks[shards] = joined([self.segments[s] for s in shards])
        self._views(shards)
        self._joined_at[shards] = time.monotonic()
        return self._blocks[shards]

    def _views(self, shards: tuple[int, ...]) -> None:
        """Each of `shards`' segments, a view of their block."""
        start = 0
        for shard in shards:
            end = start + len(self.segments[shard].rowids)
            self.segments[shard] = self._blocks[shards].rows(start, end)
            start = end

    def nearest(self, query_vector: np.ndarray, shards: list[int], k: int, scope: Scope) -> np.ndarray:
        """The slots of about the `k` memories of `shards` nearest to the query by their 8-bit codes,
        within `scope` (its window, entity and prefixes). Blocks with a 4-bit scan read their 4-bit
        codes, and only the 8-bit codes of the best FOUR_BIT_SHORTLIST * `k` rows those find in all
        of them."""
        q = np.asarray(query_vector, dtype=np.float32)
        top = float(np.abs(q).max()) or 1.0
        query = np.clip(np.rint(q / top * 127.0), -127, 127).astype(np.int8).reshape(-1, 1)
        session = self._scorer()
        slots, scores = [], []
        rough: list[tuple[Segment, np.ndarray | None, np.ndarray]] = []  # 4-bit scores: (block, its rows, theirs)
        for key, block in self.blocks(shards).items():
            if not len(block.rowids):
                continue
            inside = block.admitted(scope)
            if inside is not None and not inside.any():
                continue
            mine = None if inside is None else np.flatnonzero(inside)
            sealed = self._sealed.get(key)
            if sealed is not None:
                found = sealed.scores(q)
                rough.append((block, mine, found if mine is None else found[mine]))
                continue
            found = _eight_bit_scores(session, block.codes, block.scales, query)
            if mine is None:
                mine = np.arange(len(found))
            else:
                found = found[mine]
            if len(mine) > k:  # only a block's best k can be among the best k of all
                chosen = np.argpartition(-found, k - 1)[:k]
                mine, found = mine[chosen], found[chosen]
            slots.append(block.slots[mine])
            scores.append(found)
        if rough:
            found_slots, found = _read_again(rough, FOUR_BIT_SHORTLIST * k, session, query)
            slots.append(found_slots)
            scores.append(found)
        return best(slots, scores, k)

    def _scorer(self) -> ort.InferenceSession:
        if self._session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1  # a node's one store thread
            self._session = ort.InferenceSession(SCORES_MODEL, options, providers=["CPUExecutionProvider"])
        return self._session


def _read_again(rough: list[tuple[Segment, np.ndarray | None, np.ndarray]], n: int, session: ort.InferenceSession,
                query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best `n` rows of the blocks by their 4-bit scores (`rough`: each block, the rows scored,
    None for all, and their scores), scored again on their 8-bit codes in one scan: their slots and
    8-bit scores."""
    every = np.concatenate([found for _, _, found in rough])
    chosen = np.argpartition(-every, n - 1)[:n] if len(every) > n else np.arange(len(every))
    chosen.sort()
    lengths = np.array([len(found) for _, _, found in rough])
    ends = np.cumsum(lengths)
    picked = []
    for (block, mine, _), start, end in zip(rough, ends - lengths, ends):
        here = chosen[(chosen >= start) & (chosen < end)] - start
        if len(here):
            picked.append((block, here if mine is None else mine[here]))
    return (np.concatenate([block.slots[rows] for block, rows in picked]),
            _eight_bit_scores(session, np.concatenate([block.codes[rows] for block, rows in picked]),
                              np.concatenate([block.scales[rows] for block, rows in picked]), query))


def _eight_bit_scores(session: ort.InferenceSession, codes: np.ndarray, scales: np.ndarray,
                      query: np.ndarray) -> np.ndarray:
    """Each row's score by its 8-bit codes (`codes`, uint8 with zero point 128, and its scale) for
    the 8-bit `query` (int8, one column): comparable across blocks."""
    return session.run(None, {"codes": codes, "query": query, "zero": ZERO})[0][:, 0] * scales
