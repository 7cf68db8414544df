"""The knowledge graph: the relations memories state, read as edges between nodes."""

from __future__ import annotations

import sqlite3
from typing import Any, Sequence


def edges(db: sqlite3.Connection, entity_id: str | None, nodes: Sequence[str], direction: str,
          edge_types: Sequence[str] | None, per_node: int) -> list[dict[str, Any]]:
    """Edges touching each of `nodes` (out: node is the source, in: the target, both), newest first,
    at most `per_node` per node and direction, optionally of the given types and one entity."""
    out: list[dict[str, Any]] = []
    sides = {"out": ("subject",), "in": ("object",), "both": ("subject", "object")}[direction]
    for node in nodes:
        for column in sides:
            sql = (f"SELECT subject, predicate, object, memory_id, timestamp_ms, valid, entity_id FROM relations "
                   f"WHERE {column} = ?")
            args: list[Any] = [node]
            if edge_types:
                sql += f" AND predicate IN ({','.join('?' * len(edge_types))})"
                args.extend(edge_types)
            if entity_id is not None:
                sql += " AND entity_id = ?"
                args.append(entity_id)
            sql += " ORDER BY timestamp_ms DESC, rowid DESC LIMIT ?"
            for r in db.execute(sql, (*args, per_node)):
                out.append({"source": r[0], "edge_type": r[1], "target": r[2], "memory_id": r[3],
                            "timestamp_ms": r[4], "valid": bool(r[5]), "entity_id": r[6]})
    return out
