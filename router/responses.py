"""Response bodies of the Tellodb API, as pydantic models for the OpenAPI document only.

Handlers build plain dicts (the wire shapes the SDK 0.1.3 reads); these models describe them. Fields
are the ones clients may rely on; objects may carry more (additional properties are allowed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. validation_error")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    authority_up: bool  # the placement authority (on the head) answered the last check
    reason: str | None = None  # why not ready (503), or what is degraded


class Version(BaseModel):
    engine_version: str
    api_version: str
    auth_required: bool


class IngestResult(BaseModel):
    status: Literal["ok"]
    memory_id: str
    entity_id: str
    deduplicated: bool
    duplicate_of: str | None


class BatchResult(BaseModel):
    status: Literal["ok"]
    ingested: int = Field(description="memories stored (duplicates excluded)")
    memory_ids: list[str]
    duplicates: dict[str, str] = Field(description="memory_id -> the memory it duplicates")


class Hit(BaseModel):
    memory_id: str
    entity_id: str
    session_id: str | None
    turn_index: int | None
    created_at_ms: int
    similarity: float = Field(ge=0, le=1)
    textual_content: str
    kind: str | None


class Memory(BaseModel):
    memory_id: str
    entity_id: str
    session_id: str
    turn_index: int
    created_at_ms: int
    ingested_at_ms: int
    kind: str | None
    textual_content: str
    relations: list[list[str]] = Field(description="[subject, predicate, object] triples")


class InspectResult(Memory):
    shard: int
    node: str
    turn_window: list[Memory] | None = Field(None, description="with include_turn_window: the session's turns")


class DeleteResult(BaseModel):
    deleted: bool
    memory_id: str


class Edge(BaseModel):
    source: str
    edge_type: str
    target: str
    memory_id: str
    timestamp_ms: int
    valid: bool
    entity_id: str | None


class GraphQueryResult(BaseModel):
    subject: str
    direction: str
    count: int
    edges: list[Edge]


class WalkNode(BaseModel):
    id: str
    depth: int


class WalkEdge(Edge):
    depth: int


class GraphWalkResult(BaseModel):
    root: str
    nodes: list[WalkNode]
    edges: list[WalkEdge]


class ExportNode(WalkNode):
    label: str


class ExportEdge(BaseModel):
    id: str
    source: str
    target: str
    label: str
    edge_type: str
    memory_id: str
    timestamp_ms: int
    valid: bool


class GraphExportResult(BaseModel):
    seed: str
    nodes: list[ExportNode]
    edges: list[ExportEdge]


class Summary(BaseModel):
    """Aggregates; one that overflows a double is null."""

    count: int
    sum: float | None
    avg: float | None
    min: float | None
    max: float | None
    stddev: float | None


class Bucket(Summary):
    bucket: str = Field(description="UTC start of the hour/day/week/month")


class AnalyticsResult(Summary):
    entity_id: str
    label: str
    buckets: list[Bucket] | None = Field(None, description="only when `bucket` was asked for")


class Totals(BaseModel):
    memories: int
    entities: int
    facts_current: int
    facts_stale: int
    edges: int
    edges_valid: int
    measurements: int
    unindexed: int
    vectors: int
    nodes_up: int


class Stats(Totals):
    shards: int
    nodes: dict[str, dict[str, Any] | None] = Field(description="per node actor: its totals, per_shard counts "
                                                    "and work counters; null for a node that did not answer")
    router: dict[str, Any]


class EngineProfile(Totals):
    entity_id: None = Field(description="no entity_id given: the engine's totals")


class Fact(BaseModel):
    slot: str
    valid_from_ms: int
    memory_id: str
    textual_content: str


class EntityProfile(BaseModel):
    entity_id: str
    memories: int
    first_seen_ms: int | None
    last_seen_ms: int | None
    current_facts: list[Fact]
    recent: list[Memory]
    measurements: dict[str, int] = Field(description="label -> number of values")
    edges: int


class ErasedCounts(BaseModel):
    memories: int
    relations: int
    measurements: int


class ResetResult(ErasedCounts):
    reset: Literal[True]
    entities: int = Field(description="entities erased (each on every node, as /entity/erase does)")


class EraseResult(ErasedCounts):
    entity_id: str
    erased: Literal[True]
    shards: dict[str, ErasedCounts] = Field(description="shard -> what was removed there")


EXPORT_DESCRIPTION = (
    "Newline-delimited JSON, one object per line, each with a `type`: first `entity` {entity_id, "
    "exported_at_ms}, then per memory a `memory` line (the memory's fields) followed by its `measurement` "
    "lines {entity_id, memory_id, label, value, unit, timestamp_ms} and `relation` lines {source, edge_type, "
    "target, memory_id, timestamp_ms}, last `summary` {memories, relations, measurements}.")


class ShardsInfo(BaseModel):
    engine_version: str
    shards: int
    created_shards: int = Field(description="the shard count the cluster was created with (splits add shards)")
    ranges: list[list[int]] = Field(description="per shard, [modulus, residue]: it holds the entities whose hash "
                                                "% modulus == residue")
    model: str
    dimension: int | None
    nodes: dict[str, str] = Field(description="the node of each shard, by shard number")


class ClusterChange(BaseModel):
    epoch: int = Field(description="the placement's epoch: it grows with every change")
    nodes: list[str] = Field(description="the members: nodes that own shards or are to receive some")
    pending_moves: int = Field(description="copies not where the balanced placement puts them yet")
    pending_handovers: int = Field(0, description="primaries to hand to another copy once the copies are in place")
    behind: list[list[Any]] = Field([], description="[shard, node] follower copies that may miss acknowledged writes "
                                                     "(their primary wrote without them): never promoted by a failover")
    moving: list[dict[str, Any]] = Field(description="the move in progress: shard, from, to, state, bytes")
    error: str | None = Field(description="why the last rebalance stopped, if it did")
    rebalancing: bool
    moved_shards: int = Field(description="shards moved since the placement authority started")
    moved_bytes: int
    auto_rebalance: bool = Field(False, description="a node that joins becomes a member and gets its share by itself")
    max_bytes_per_s: int = Field(0, description="the moves' average copy rate is kept under this; 0: no limit")
    paced_s: float = Field(0.0, description="seconds the rebalance waited to keep under max_bytes_per_s")
    shards: int = Field(0, description="how many shards there are now (a split adds one)")
    max_shard_bytes: int = Field(0, description="a primary shard larger than this splits by itself; 0: only on command")
    splitting: int | None = Field(None, description="the shard a split just asked for (POST /admin/shards/split)")


class ClusterStatus(ClusterChange):
    owner: list[str] = Field(description="the node of each shard, by shard number")
    members: dict[str, dict[str, Any]] = Field(description="per node: member, joined, shards, memories, bytes")
    history: list[dict[str, Any]] = Field(description="recent moves with their timings (fence_ms, seconds)")
