"""Memory id grammar and the stable hash that places entities on shards.

Ids of the form `<entity>::<session>::<turn>` name their entity, session and turn (a whole number;
the official SDK's default `<entity>::sdk::<uuid>` is a memory of session `sdk` with no turn, shown
as 0 on the wire). Such an id must be ingested under the entity it names, so it always lives in that
entity's shard and is found there directly. Any other string is a free-form id: valid, with no
session (`""`), looked up on every node.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import NamedTuple


class ParsedId(NamedTuple):
    entity_prefix: str | None
    session_id: str
    turn_index: int | None


def parse_memory_id(memory_id: str) -> ParsedId:
    parts = memory_id.split("::")
    if len(parts) < 3:
        return ParsedId(None, "", None)
    entity, session, turn = "::".join(parts[:-2]), parts[-2], parts[-1]
    is_turn = turn.isascii() and turn.isdigit() and len(turn) <= 9
    return ParsedId(entity, session, int(turn) if is_turn else None)


def new_memory_id(entity_id: str) -> str:
    """The SDK's default id shape, for ingests that send none."""
    return f"{entity_id}::sdk::{uuid.uuid4().hex}"


def stable_hash(text: str) -> int:
    """64-bit hash that is the same in every process and release (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def shard_of(entity_id: str, shards: int) -> int:
    return stable_hash(entity_id) % shards


def entity_token(entity_id: str) -> str:
    """A single FTS5 token naming the entity, so full-text search can filter by entity via the index."""
    return "e" + hashlib.blake2b(entity_id.encode("utf-8"), digest_size=10).hexdigest()
