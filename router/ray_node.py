"""This process's own Ray node, for the multi-machine roles (`tellodb head`, `node`, `router`).

Each role process starts the Ray processes of its machine slot itself (GCS on the head, a raylet
everywhere) through Ray's node launcher, the one `ray.cluster_utils` uses, instead of `ray start`:
`ray start --block` leaves its raylet and agents running when it is stopped, and several nodes
on one machine need their own temp folders and ports. So a role owns the PIDs it started and
stops exactly those (`RayNode.stop`), and its driver connects to its own raylet (`connect`), so
one role going away never takes another role's connection with it.

Addresses: with a loopback `node_ip` every Ray server listens on 127.0.0.1 (Ray's single-machine
mode is switched on for that, as in router/ray_local.py), which is how tests run a whole cluster
on one machine; with a network address Ray listens there and the cluster spans machines.

Token: every role needs the cluster's Ray token (Ray 2.52+ token authentication). The head
creates it in its data directory (`ray_auth_token`, 0600); other machines get a copy of that file
and name it with `--ray-token-file` (or `TELLODB_RAY_TOKEN_FILE`), or set `RAY_AUTH_TOKEN`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from router import ray_local

log = logging.getLogger("tellodb")

ROLE_LABEL = "tellodb-role"  # head, node or router
NODE_LABEL = "tellodb-node"  # the node name a `tellodb node` machine slot is the home of
OBJECT_STORE_BYTES = 128 << 20  # shard copies travel in 4 MiB chunks; the default (30% of RAM) is far too much


class RayTokenMissing(Exception):
    pass


def use_token(token_file: str | None, head_data_dir: str | None = None) -> None:
    """Point Ray at the cluster's token (before Ray starts anything); the head creates its own."""
    os.environ["RAY_AUTH_MODE"] = "token"
    if head_data_dir is not None:
        token_file = ray_local.token_path(head_data_dir)
    if token_file:
        if not os.path.isfile(token_file):
            raise RayTokenMissing(f"--ray-token-file: no file {token_file}")
        os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.abspath(token_file)
        os.environ.pop("RAY_AUTH_TOKEN", None)
    elif not os.environ.get("RAY_AUTH_TOKEN"):
        raise RayTokenMissing(
            "the cluster's Ray token is needed: copy <head data-dir>/ray_auth_token here and pass "
            "--ray-token-file PATH (or set TELLODB_RAY_TOKEN_FILE, or RAY_AUTH_TOKEN)")
    _refresh_ray_settings()


def use_address(node_ip: str) -> None:
    """Loopback addresses keep every Ray server on 127.0.0.1 (see the module docstring)."""
    if node_ip.startswith("127.") or node_ip == "localhost":
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    else:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    _refresh_ray_settings()


def _refresh_ray_settings() -> None:
    if "ray._private.ray_constants" in sys.modules:  # Ray read these at import: refresh them
        import ray._private.ray_constants as ray_constants
        from ray._raylet import Config

        ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"
        Config.initialize("")


def temp_dir(key: str) -> str:
    """A short per-slot temp folder (Ray puts Unix sockets under it; their paths must stay short)."""
    digest = hashlib.blake2b(key.encode(), digest_size=5).hexdigest()
    return os.path.join(tempfile.gettempdir(), f"tdb-{digest}")


@dataclass
class RayNode:
    """One Ray node started by this process: the head (GCS and a raylet) or a worker raylet."""

    node_ip: str
    temp_dir: str
    head: bool = False
    port: int | None = None  # the head's GCS port
    address: str | None = None  # a worker's head, host:port
    cpus: float = 0
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)
    object_store_bytes: int = OBJECT_STORE_BYTES
    _node: Any = None

    def start(self) -> str:
        """Start the Ray processes; returns the cluster's GCS address."""
        from ray._private.node import Node
        from ray._private.parameter import RayParams

        params: dict[str, Any] = dict(
            node_ip_address=self.node_ip, temp_dir=self.temp_dir, num_cpus=self.cpus, num_gpus=0,
            labels=self.labels, resources=self.resources, object_store_memory=self.object_store_bytes,
            min_worker_port=0, max_worker_port=0, include_dashboard=False)
        if self.head:
            params.update(gcs_server_port=self.port)
        else:
            params.update(gcs_address=self.address, node_manager_port=0, include_log_monitor=False,
                          dashboard_agent_listen_port=None)
        self._node = Node(RayParams(**params), head=self.head, shutdown_at_exit=True, spawn_reaper=False)
        return self._node.gcs_address

    @property
    def pids(self) -> list[int]:
        if self._node is None:
            return []
        return [p.process.pid for procs in self._node.all_processes.values() for p in procs]

    def connect(self, namespace: str) -> None:
        """Make this process a Ray driver attached to its own raylet."""
        import ray

        ray.init(address=self._node.gcs_address, _temp_dir=self.temp_dir, namespace=namespace,
                 logging_level=logging.WARNING, log_to_driver=True)

    def stop(self) -> None:
        """Stop the Ray processes this node started (its workers and actors go with its raylet)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._node is not None:
            self._node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            self._node = None
