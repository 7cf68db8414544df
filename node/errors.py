"""Failures a node reports to its caller, each with a stable code the router turns into an HTTP status.

They cross the Ray boundary as exceptions (or as values, for merged calls), so they stay plain
picklable classes. `router.cluster` maps each to its API error; anything else is an internal fault.
"""

from __future__ import annotations

import errno
import sqlite3


class NodeError(Exception):
    """A failure with a meaning for the client; `code` names it."""

    code = "internal"


class NotOwnedError(NodeError, LookupError):
    """A request reached a node that does not own the shard (stale placement): retry elsewhere."""

    code = "not_owned"


class StorageFull(NodeError):
    """The node's data volume is full, or below its free-space reserve: writes are refused whole,
    reads go on, and writes work again by themselves once space returns."""

    code = "insufficient_storage"


class DeadlineExceeded(NodeError):
    """A write reached its commit after the caller's deadline: it was not committed."""

    code = "deadline_exceeded"


class TooFewReplicas(NodeError):
    """A write committed on the shard's primary while fewer copies than `min_live_replicas` are
    live: it is not acknowledged (503). Retrying it is safe: the router assigns ids, so it upserts."""

    code = "too_few_replicas"


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's SQLITE_FULL or the OS's ENOSPC/EDQUOT (Chroma writes files too)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
