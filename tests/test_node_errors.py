"""Failures a node reports reach the client as the API error they mean, never as a 500."""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest

from node.errors import DeadlineExceeded, NotOwnedError, StorageFull, TooFewReplicas
from node.records import IngestItem
from router.node_client import api_error
from router.errors import InsufficientStorage, Unavailable


async def test_a_write_for_a_shard_the_node_does_not_own_is_a_503(cluster):
    """A stale placement sends a write to a node that does not own the shard: retry, not a 500."""
    shard = next(s for s in range(cluster.config.shards) if cluster.placement.node_of_shard(s) == "node-1")
    item = IngestItem(memory_id=f"x::s::{uuid.uuid4().hex[:6]}", entity_id="x", session_id="s", turn_index=None,
                      created_at_ms=0, textual_content="misrouted", shard=shard)
    routing = cluster.routing
    config, retries = routing.config, cluster.moved_retries
    routing.config = dataclasses.replace(config, request_timeout_s=1)  # no refresh helps here: give up soon
    try:
        with pytest.raises(Unavailable) as raised:
            await routing.execute(shard, lambda _: cluster.nodes["node-0"].ingest([item], time.time() + 30))
    finally:
        routing.config = config
    assert raised.value.status == 503 and "placement changed, retry" in raised.value.message
    assert cluster.moved_retries > retries  # the router read the placement again and retried first


def test_each_node_error_has_its_status():
    assert api_error(StorageFull("full")).status == 507 and isinstance(api_error(StorageFull("x")), InsufficientStorage)
    assert api_error(DeadlineExceeded("late")).status == 503
    assert api_error(NotOwnedError("moved")).status == 503
    assert api_error(TooFewReplicas("one copy live")).status == 503
