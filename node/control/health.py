"""Replication health: each shard's copies, their sequence numbers and lag, and which shards are
under-replicated, from the nodes' `replication_status` reports (the authority's `status()`).

A follower's row is `live` when its primary's link to it is live, or, when the primary has no
link to it yet (nothing was written since the link started), when its seq equals the primary's.
Each row's `state` says why a copy is not live, for the operator: `joining` (its node has not
joined the authority, yet or again: a node just started, a restarted one), `down` (its node is
silent), `catching up` (its node answers but the copy is behind: just added, being re-seeded,
back from an outage), or `live`. A shard is under-replicated when a copy is missing (fewer than `replication`) or not live (down,
catching up, being re-seeded); a live copy's lag is the push in flight: writes wait for it, so it
is not a missing copy.
"""

from __future__ import annotations

import asyncio
from typing import Any

from node.names import Handles
from node.tuning import HEALTH_ASK_TIMEOUT_S



async def reports(handles: Handles, names: list[str]) -> dict[str, dict | None]:
    """Each node's `replication_status` (None: no answer in time, or no such actor)."""

    async def one(name: str) -> dict | None:
        try:
            return await asyncio.wait_for(handles.get(name).replication_status.remote(), HEALTH_ASK_TIMEOUT_S)
        except Exception:
            handles.forget(name)  # a restarted node is a new actor
            return None

    return dict(zip(names, await asyncio.gather(*(one(n) for n in names))))


def copy_state(row: dict[str, Any], joined: set[str], down: set[str]) -> str:
    """A copy's `state` (see above); a primary that answers nothing is `not answering`."""
    if row["live"]:
        return "live"
    if row["node"] not in joined:
        return "joining"
    if row["node"] in down:
        return "down"
    return "catching up" if row["role"] == "follower" else "not answering"


def shard_health(replicas: list[list[str]], replication: int, found: dict[str, dict | None], joined: set[str],
                 down: set[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """(`shards_detail`, `under_replicated`) of a placement's copies (`replicas`, the primary first)
    given the nodes' reports (`found`), the nodes that joined and those found silent (`down`)."""
    detail, under = [], []
    for shard, copies in enumerate(replicas):
        primary = (found.get(copies[0]) or {}).get("shards", {}).get(shard)
        seq = primary["seq"] if primary else None
        rows = [{"node": copies[0], "role": "primary", "seq": seq, "live": primary is not None, "lag": 0}]
        for f in copies[1:]:
            link = (primary or {}).get("followers", {}).get(f) or {}
            mine = (found.get(f) or {}).get("shards", {}).get(shard)
            their = mine["seq"] if mine else None
            in_step = mine is not None and (their or 0) == (seq or 0)
            live = bool(link.get("live")) if link else in_step  # no link yet: nothing written since it started
            rows.append({"node": f, "role": "follower", "seq": their, "acked": link.get("acked"), "live": live,
                         "lag": 0 if in_step else link.get("lag"), **({"error": link["error"]} if link.get("error") else {})})
        for row in rows:
            row["state"] = copy_state(row, joined, down)
        lags = [r["lag"] for r in rows[1:]]
        lag = None if any(x is None for x in lags) else max(lags, default=0)
        if len(copies) < replication or not all(r["live"] for r in rows):
            under.append(shard)
        detail.append({"shard": shard, "primary": copies[0], "seq": seq, "lag": lag, "copies": rows})
    return detail, under
