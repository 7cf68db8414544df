"""One shard: a SQLite file (the source of truth) and a Chroma collection (a derived vector index).

The package splits the shard store by job; `ShardStore` is the one object the node uses.
"""

from __future__ import annotations

from node.store.records import MemoryRecord
from node.store.shard import ShardStore
from node.store.snapshot import file_sha256
from node.store.transaction import upsert_together

__all__ = ["MemoryRecord", "ShardStore", "file_sha256", "upsert_together"]
