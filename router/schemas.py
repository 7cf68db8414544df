"""Request bodies of the Tellodb API as the official SDK (tellodb 0.1.3) sends them.

Pydantic models validate shapes and ranges; `parse` turns a failure into a 422 that names the
field (`items.3.entity_id: ...`). Unknown fields are ignored, so newer SDKs keep working.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError,
                      field_validator)

from node.config import MAX_LIST_CEILING, MAX_TEXT_CHARS_CEILING
from router.errors import ValidationFailed

MAX_ID = 512
MAX_TEXT = MAX_TEXT_CHARS_CEILING  # a ceiling; the configured limit is checked by router.limits
MAX_TIMESTAMP_MS = 253402300799999  # 9999-12-31

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=r"^[^\x00-\x1f]+$")]
Label = Annotated[str, Field(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class IngestRequest(_Body):
    entity_id: Id
    textual_content: Annotated[str, Field(min_length=1, max_length=MAX_TEXT,
                                          validation_alias=AliasChoices("textual_content", "text"))]
    memory_id: Id | None = None
    timestamp: Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP_MS)] | None = None
    relations: Annotated[list[list[Label]], Field(max_length=MAX_LIST_CEILING)] | None = None
    kind: Annotated[str, Field(max_length=64)] | None = None
    enable_semantic_dedup: StrictBool | None = None
    enable_consolidation: StrictBool | None = None
    metrics: Annotated[dict[Label, StrictFloat | StrictInt], Field(max_length=MAX_LIST_CEILING)] | None = None  # explicit measurements
    fact_key: Label | None = None  # the slot this memory's fact fills; a newer one supersedes it

    @field_validator("metrics")
    @classmethod
    def _finite(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for label, value in (v or {}).items():
            try:
                finite = not isinstance(value, bool) and math.isfinite(value)
            except OverflowError:  # an integer past float's range
                finite = False
            if not finite:
                raise ValueError(f"metric {label!r} must be a finite number")
        return v

    @field_validator("textual_content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("relations")
    @classmethod
    def _pairs_or_triples(cls, v: list[list[str]] | None) -> list[list[str]] | None:
        for i, rel in enumerate(v or ()):
            if len(rel) not in (2, 3):
                raise ValueError(f"relation {i} has {len(rel)} parts; send [predicate, object] or "
                                 "[subject, predicate, object]")
        return v

    def triples(self) -> list[tuple[str, str, str]]:
        """Relations as (subject, predicate, object); a pair's subject is the entity."""
        return [tuple(r) if len(r) == 3 else (self.entity_id, r[0], r[1]) for r in self.relations or ()]


class IngestBatchRequest(_Body):
    items: list[IngestRequest]


class QueryRequest(_Body):
    textual_query: Annotated[str, Field(min_length=1, max_length=10_000,
                                        validation_alias=AliasChoices("textual_query", "query"))]
    limit: Annotated[StrictInt, Field(ge=1, validation_alias=AliasChoices("limit", "top_k"))] = 10
    entity_id: Id | None = None
    point_in_time_ms: Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP_MS)] | None = None  # as of this instant
    # Accepted for SDK compatibility; ranking is always hybrid, these change nothing (no cross-encoder
    # for a rerank: router.timing.RERANK_APPLIED, docs/guide/api.md).
    enable_neural_rerank: StrictBool | None = None
    include_evidence: StrictBool | None = None

    @field_validator("textual_query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class InspectRequest(_Body):
    memory_id: Id
    include_turn_window: StrictBool = False
    turn_window_radius: Annotated[StrictInt, Field(ge=0, le=100)] = 2


class TemporalQuery(_Body):
    """Query-string parameters of GET /temporal/query (strings on the wire, converted here)."""

    entity_id: Id | None = None
    textual_query: Annotated[str, Field(min_length=1, max_length=10_000)] | None = None
    window_start_ms: Annotated[int, Field(ge=0, le=MAX_TIMESTAMP_MS)] | None = None
    window_end_ms: Annotated[int, Field(ge=0, le=MAX_TIMESTAMP_MS)] | None = None
    limit: Annotated[int, Field(ge=1)] = 10

    @field_validator("textual_query")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v if v is None or v.strip() else None


Direction = Annotated[str, Field(pattern="^(out|in|both)$")]


class GraphQueryRequest(_Body):
    subject: Label
    edge_type: Label | None = None
    direction: Direction = "out"
    limit: Annotated[StrictInt, Field(ge=1, le=1000)] = 50
    user_id: Id | None = None


class _Walk(_Body):
    """What a breadth-first walk takes; walk and export differ in their defaults."""

    direction: Direction = "out"
    edge_types: Annotated[list[Label], Field(max_length=64)] | None = None
    depth: Annotated[StrictInt, Field(ge=1, le=6)] = 2
    breadth: Annotated[StrictInt, Field(ge=1, le=100)] = 10
    user_id: Id | None = None


class GraphWalkRequest(_Walk):
    node: Label
    limit: Annotated[StrictInt, Field(ge=1, le=5000)] = 200  # edges


class GraphExportRequest(_Walk):
    seed: Label
    direction: Direction = "both"
    breadth: Annotated[StrictInt, Field(ge=1, le=100)] = 25
    max_nodes: Annotated[StrictInt, Field(ge=1, le=5000)] = 200


class AnalyticsRequest(_Body):
    entity_id: Id
    label: Label
    start_timestamp_ms: Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP_MS)] | None = None
    end_timestamp_ms: Annotated[StrictInt, Field(ge=0, le=MAX_TIMESTAMP_MS)] | None = None
    bucket: Annotated[str, Field(pattern="^(hour|day|week|month)$")] | None = None


class ProfileQuery(_Body):
    entity_id: Id | None = None
    recent: Annotated[int, Field(ge=0, le=100)] = 10


class EntityRequest(_Body):
    entity_id: Id


class DeleteRequest(_Body):
    memory_id: Id
    reason: Annotated[str, Field(max_length=1000)] | None = None


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise ValidationFailed(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            problems.append(f"{where}: {err['msg']}")
        raise ValidationFailed("; ".join(problems)) from None


class NodeRequest(_Body):
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                               description="the name its `tellodb node --name` process joined with")]


class SplitRequest(_Body):
    shard: Annotated[StrictInt | None, Field(None, ge=0, description="the shard to split in two; none: the largest primary")]


RESET_PHRASES = ("delete-all-data", "RESET_DATA_DANGEROUS")  # the upstream engine's (src/api/utils.rs, handlers/system.rs)


class ResetRequest(_Body):
    confirm: Annotated[str, Field(max_length=64, description="`delete-all-data`: without it the reset is refused "
                                  "(400)")] | None = None
    clear_embedding_cache: StrictBool | None = None  # the upstream's; this engine keeps no embedding cache
