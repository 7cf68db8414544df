"""What a read may see: one entity (or all) and a window of creation times.

Every read path filters by the same scope in its own language: SQL over `memories`, Chroma's
`where`, a NumPy mask over an entity's cached creation times, and a check on rows already fetched
(Chroma may still return a stale copy of a row that has moved out of scope). One object renders
all of them, so they cannot drift apart.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

Window = tuple[int | None, int | None] | None  # (start_ms, end_ms) of created_at_ms, inclusive


@dataclass(frozen=True)
class Scope:
    entity_id: str | None = None  # None: every entity of the shard (of `prefixes`, if any)
    start_ms: int | None = None  # inclusive; None: no lower bound
    end_ms: int | None = None  # inclusive; None: no upper bound
    prefixes: tuple[str, ...] = ()  # entity-id prefixes a scoped key may see; (): every entity

    @classmethod
    def of(cls, entity_id: str | None, window: Window = None, prefixes: tuple[str, ...] | None = None) -> Scope:
        start, end = window if window is not None else (None, None)
        return cls(entity_id, start, end, tuple(prefixes or ()))

    @property
    def timeless(self) -> bool:
        return self.start_ms is None and self.end_ms is None

    @property
    def every_row(self) -> bool:
        """No filter but (maybe) the entity: counts and indexes of the entity answer for it."""
        return self.timeless and not self.prefixes

    def any_entity(self) -> Scope:
        """The same window over every entity (for the FTS tables, which filter the entity themselves)."""
        return replace(self, entity_id=None)

    def _bounds(self) -> list[tuple[str, int]]:
        return [(op, bound) for op, bound in ((">=", self.start_ms), ("<=", self.end_ms)) if bound is not None]

    def sql(self, alias: str | None = "m", time_column: str = "created_at_ms") -> tuple[str, list[Any]]:
        """A WHERE clause (and its arguments) over a table with `entity_id` and `time_column`."""
        prefix = f"{alias}." if alias else ""
        clauses, args = ["1"], []
        if self.entity_id is not None:
            clauses.append(f"{prefix}entity_id = ?")
            args.append(self.entity_id)
        for op, bound in self._bounds():
            clauses.append(f"{prefix}{time_column} {op} ?")
            args.append(bound)
        if self.prefixes:  # ranges over the (entity_id, ...) index, not a scan of every row
            ranges = []
            for p in self.prefixes:
                upper = _successor(p)
                ranges.append(f"({prefix}entity_id >= ?" + (f" AND {prefix}entity_id < ?)" if upper else ")"))
                args += [p, upper] if upper else [p]
            clauses.append("(" + " OR ".join(ranges) + ")")
        return " AND ".join(clauses), args

    def chroma_where(self) -> dict | None:
        """The filter of a Chroma query (metadata `entity_id`, `created_at_ms`)."""
        terms: list[dict] = [{"entity_id": self.entity_id}] if self.entity_id is not None else []
        terms += [{"created_at_ms": {"$gte" if op == ">=" else "$lte": bound}} for op, bound in self._bounds()]
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else {"$and": terms}

    def mask(self, created_at_ms: np.ndarray) -> np.ndarray:
        """Which of `created_at_ms` (a number or an array of them) lie within the window."""
        inside = np.full(np.shape(created_at_ms), True)
        if self.start_ms is not None:
            inside = inside & (created_at_ms >= self.start_ms)
        if self.end_ms is not None:
            inside = inside & (created_at_ms <= self.end_ms)
        return inside

    def admits(self, entity_id: str, created_at_ms: int) -> bool:
        """The check of `sql` for a row already fetched."""
        return self.admits_entity(entity_id) and bool(self.mask(created_at_ms))

    def admits_entity(self, entity_id: str) -> bool:
        """The entity and prefix part of `admits`."""
        return ((self.entity_id is None or entity_id == self.entity_id)
                and (not self.prefixes or any(entity_id.startswith(p) for p in self.prefixes)))


@functools.lru_cache(maxsize=256)
def admitted_names(names: tuple[str, ...], scope: Scope) -> np.ndarray:
    """Which of `names` (entity ids) `scope` admits, as a mask; kept, since a query asks it of every
    block of rows it scans (node/node_vectors.py, node/lexicon.py)."""
    return np.array([scope.admits_entity(name) for name in names], dtype=bool)


def _successor(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix` (None: there is none)."""
    while prefix and prefix[-1] == "\U0010ffff":
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None
