"""The placement authority as a Ray actor (node.control.authority), named so every node and router finds it."""

from __future__ import annotations

from typing import Any

import ray

from node.config import ClusterConfig
from node.control.authority import PlacementAuthority
from node.names import AUTHORITY_NAME, NAMESPACE

AuthorityActor = ray.remote(PlacementAuthority)


def start_authority(data_dir: str, config: ClusterConfig, movable: bool,
                    label_selector: dict[str, str] | None = None) -> Any:
    """Create (or find) the placement authority, on the head when pinned there."""
    options: dict[str, Any] = dict(name=AUTHORITY_NAME, namespace=NAMESPACE, num_cpus=0, max_restarts=-1,
                                   max_concurrency=64, get_if_exists=True, enable_task_events=False)
    if label_selector:
        options["label_selector"] = label_selector
    return AuthorityActor.options(**options).remote(data_dir, config.shards, config.node_names, movable,
                                                    config.replication, config.failover_after_s,
                                                    config.rebuild_after_s, config.auto_rebalance,
                                                    config.rebalance.max_bytes_per_s, config.max_shard_bytes)
