"""Typed records that cross the Ray boundary between router and node.

An `IngestItem` is one validated write: the router builds it from a request (router.handlers.to_item),
places it on its shard (router.cluster.Cluster.ingest) and a node stores it. Frozen: the router
places an item by making a copy (`placed`), so nothing changes an item under a caller's feet.
Hits and other answers stay plain dicts: they are the HTTP wire format, built by the shard store
and shaped for the client by router.responses. A query's hits travel as `Hits`: that list, and
the seconds the query spent per stage (the router sends them as the x-tm-* headers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class IngestItem:
    memory_id: str
    entity_id: str
    session_id: str  # from an `<entity>::<session>::<turn>` id (node.ids), else ""
    turn_index: int | None
    created_at_ms: int
    textual_content: str
    kind: str | None = None
    relations: tuple[tuple[str, str, str], ...] = ()  # (subject, predicate, object)
    metrics: tuple[tuple[str, float], ...] = ()  # (label, value)
    fact_key: str | None = None
    enable_semantic_dedup: bool = False
    generated_id: bool = False  # the engine made the id, so the memory is new for sure (Cluster.ingest)
    shard: int | None = None  # the entity's shard, set by the router

    def placed(self, shard: int) -> IngestItem:
        return replace(self, shard=shard)


class Hits(list):
    """A query's hits (dicts), best first, and `stages`: seconds per stage (embed, ann, fts, fuse,
    hydrate, storage: router/timing.py). Pickles as a list with an attribute, so it crosses Ray."""

    def __init__(self, hits=(), stages: dict[str, float] | None = None) -> None:
        super().__init__(hits)
        self.stages = dict(stages or {})

    @classmethod
    def merged(cls, parts: list[Hits], hits: list) -> Hits:
        """`hits` chosen from parts that ran side by side: each stage took as long as its slowest part."""
        stages: dict[str, float] = {}
        for part in parts:
            for stage, seconds in getattr(part, "stages", {}).items():
                stages[stage] = max(stages.get(stage, 0.0), seconds)
        return cls(hits, stages)


class ShardList(list):
    """The shards a router asks a node for, and `of`: how many shards its placement has. A node
    whose placement has another count refuses the request (a split happened that one of them has
    not seen: `ShardSet.check_shard_count`), so a router never merges an answer that misses a
    half. Pickles as a list with an attribute, as `Hits` does."""

    def __init__(self, shards=(), of: int = 0) -> None:
        super().__init__(shards)
        self.of = of
