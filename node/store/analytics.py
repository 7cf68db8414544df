"""Analytics over an entity's measurements (numbers with units found in its memories), in SQLite."""

from __future__ import annotations

import math
import sqlite3
from typing import Any

from node.store.scope import Scope

BUCKETS = {  # bucket key of a measurement's UTC time, in SQLite
    "hour": "strftime('%Y-%m-%dT%H:00', timestamp_ms / 1000, 'unixepoch')",
    "day": "strftime('%Y-%m-%d', timestamp_ms / 1000, 'unixepoch')",
    "week": "strftime('%Y-%m-%d', timestamp_ms / 1000, 'unixepoch', 'weekday 0', '-6 days')",  # its Monday
    "month": "strftime('%Y-%m', timestamp_ms / 1000, 'unixepoch')",
}


def _summaries(db: sqlite3.Connection, source: str, args: list[Any]) -> list[dict[str, Any]]:
    """Per group `b` of `source` (rows b, value): count, sum, avg, min, max and population
    stddev, all in SQLite (two passes: the mean, then squared deviations from it)."""
    sql = f"""
        WITH src AS ({source}),
             agg AS (SELECT b, COUNT(*) AS n, TOTAL(value) AS total, AVG(value) AS mean,
                            MIN(value) AS low, MAX(value) AS high FROM src GROUP BY b)
        SELECT agg.b, agg.n, agg.total, agg.mean, agg.low, agg.high,
               (SELECT TOTAL((src.value - agg.mean) * (src.value - agg.mean)) FROM src WHERE src.b = agg.b)
        FROM agg ORDER BY agg.b"""
    return [{"bucket": b, "count": n, "sum": total, "avg": mean, "min": low, "max": high,
             "stddev": math.sqrt(squares / n)} for b, n, total, mean, low, high, squares in
            db.execute(sql, args)]


def analytics(db: sqlite3.Connection, entity_id: str, label: str, start_ms: int | None, end_ms: int | None,
              bucket: str | None) -> dict[str, Any]:
    """count, sum, avg, min, max and population stddev of a label's values, computed in SQLite;
    with `bucket` (hour, day, week, month; UTC) the same per bucket, oldest first."""
    where, args = Scope(entity_id, start_ms, end_ms).sql(alias=None, time_column="timestamp_ms")
    scope = f"{where} AND label = ?"
    args.append(label)
    overall = f"SELECT 'all' AS b, value FROM measurements WHERE {scope}"
    rows = _summaries(db, overall, args)
    result = rows[0] if rows else {"bucket": "all", "count": 0, "sum": 0.0, "avg": None, "min": None,
                                   "max": None, "stddev": None}
    result.pop("bucket")
    if bucket is not None:
        grouped = f"SELECT {BUCKETS[bucket]} AS b, value FROM measurements WHERE {scope}"
        result["buckets"] = _summaries(db, grouped, args)
    return result
