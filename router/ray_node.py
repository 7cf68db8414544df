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

Ports (`ray_port_range`, `--ray-port-range LOW-HIGH`, TELLODB_RAY_PORT_RANGE): every port a role's
Ray processes listen on comes from the range (`port_plan`), for firewalls and NetworkPolicies: the
head's GCS (its first port unless --port names another in the range) and autoscaler metrics, the
raylet's node manager and object manager, the dashboard agent's gRPC and HTTP ports, the runtime env agent, the metrics
export port, and the workers' and the driver's ports (Ray's min/max_worker_port: the rest of the
range). The dashboard and Ray Client servers are never started. Without a range Ray picks free
ports. Roles sharing a machine need ranges of their own.

The head going away (router.membership): a node's or router's Ray processes wait
`head_outage_s` for it (`tolerate_head_outage`, Ray's `gcs_rpc_server_reconnect_timeout_s`),
and actors keep calling each other meanwhile. A driver's two GCS listener threads (errors, and
workers' logs) poll in a tight loop while the GCS is away (about 40% of a core per role process,
measured): `connect` stops them, and `LogForwarder` forwards this role's actors' logs with a pause
between polls that find no GCS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from node.config import ConfigError
from router import ray_local, tuning

log = logging.getLogger("tellodb")

ROLE_LABEL = "tellodb-role"  # head, node or router
NODE_LABEL = "tellodb-node"  # the node name a `tellodb node` machine slot is the home of


AUTOSCALER_PORT = "AUTOSCALER_METRIC_PORT"  # the head's autoscaler monitor: Ray reads it from the environment
# Ray's fixed ports of a node (RayParams names), taken from the start of a role's range.
FIXED_PORTS = ("node_manager_port", "object_manager_port", "metrics_agent_port", "dashboard_agent_listen_port",
               "runtime_env_agent_port", "metrics_export_port")


class RayTokenMissing(Exception):
    pass


def port_plan(port_range: tuple[int, int] | None, gcs_port: int | None = None, agent: bool = True) -> dict[str, int]:
    """RayParams that keep every port of a Ray node inside `port_range` (LOW, HIGH): its fixed ports
    first (around the head's `gcs_port`, one of the range's first ports), then the workers' ports up
    to HIGH. {} without a range: Ray chooses. Without `agent` (Ray's minimal install: its dashboard
    agent serves no gRPC) the metrics agent's port stays unset, or the GCS and raylet would log
    that they cannot reach it; its slot in the range stays reserved."""
    if port_range is None:
        return {}
    low, high = port_range
    head_ports = len(FIXED_PORTS) + 2 * (gcs_port is not None)  # a head: its GCS and the autoscaler's metrics
    if gcs_port is not None and not low <= gcs_port < low + head_ports:
        raise ConfigError(f"ray_port_range: {low}-{high}: the head's GCS port {gcs_port} must be one of its first "
                         f"{head_ports} ports")
    fixed = [p for p in range(low, low + head_ports) if p != gcs_port]
    if high - (low + head_ports) < 1:
        raise ConfigError(f"ray_port_range: {low}-{high}: no room for Ray's workers after its {head_ports} fixed ports")
    names = FIXED_PORTS + ((AUTOSCALER_PORT,) if gcs_port is not None else ())
    plan = {**dict(zip(names, fixed)), "min_worker_port": low + head_ports, "max_worker_port": high}
    if not agent:
        del plan["metrics_agent_port"]
    return plan


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


def tolerate_head_outage(seconds: float) -> None:
    """This role's Ray processes (raylet, workers, driver) keep going this long without the head."""
    os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(max(1, int(seconds)))
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
    object_store_bytes: int = tuning.OBJECT_STORE_BYTES
    redis_password: str | None = None  # the head's, for GCS fault tolerance (RAY_REDIS_ADDRESS)
    port_range: tuple[int, int] | None = None  # every port inside (LOW, HIGH); None: Ray's choice (port_plan)
    _node: Any = None

    def start(self) -> str:
        """Start the Ray processes; returns the cluster's GCS address."""
        from ray._private.node import Node
        from ray._private.parameter import RayParams
        from ray._private.utils import get_dashboard_dependency_error

        params: dict[str, Any] = dict(
            node_ip_address=self.node_ip, temp_dir=self.temp_dir, num_cpus=self.cpus, num_gpus=0,
            labels=self.labels, resources=self.resources, object_store_memory=self.object_store_bytes,
            min_worker_port=0, max_worker_port=0, include_dashboard=False)
        if self.head:
            params.update(gcs_server_port=self.port)
            if self.redis_password:
                params.update(redis_password=self.redis_password)
        else:
            params.update(gcs_address=self.address, node_manager_port=0, include_log_monitor=False,
                          dashboard_agent_listen_port=None)
        plan = port_plan(self.port_range, self.port if self.head else None, agent=get_dashboard_dependency_error() is None)
        if AUTOSCALER_PORT in plan:  # the monitor process inherits it
            os.environ[AUTOSCALER_PORT] = str(plan.pop(AUTOSCALER_PORT))
        params.update(plan)
        # No exit hooks of Ray's: they install a SIGTERM handler (only the main thread may, and a
        # router rejoins from another) in place of the role's; the role stops its processes itself.
        self._node = Node(RayParams(**params), head=self.head, shutdown_at_exit=False, spawn_reaper=False)
        return self._node.gcs_address

    @property
    def pids(self) -> list[int]:
        if self._node is None:
            return []
        return [p.process.pid for procs in self._node.all_processes.values() for p in procs]

    @property
    def cluster_id(self) -> str | None:
        """The id of the Ray cluster this node joined (a head restarted without GCS fault tolerance
        starts a new one)."""
        found = getattr(self._node, "cluster_id", None)
        return found.hex() if found is not None else None

    def exited(self) -> int | None:
        """The PID of one of this node's Ray processes that has exited, or None while all run."""
        if self._node is None:
            return None
        for procs in self._node.all_processes.values():
            for p in procs:
                if p.process.poll() is not None:
                    return p.process.pid
        return None

    def connect(self, namespace: str) -> None:
        """Make this process a Ray driver attached to its own raylet, without the driver's GCS
        listener threads (see the module docstring; LogForwarder brings the logs back)."""
        import ray
        from ray._private import worker

        ray.init(address=self._node.gcs_address, _temp_dir=self.temp_dir, namespace=namespace,
                 logging_level=logging.WARNING, log_to_driver=False)
        worker.global_worker.threads_stopped.set()  # the error listener's loop ends at its next poll

    def stop(self) -> None:
        """Stop the Ray processes this node started (its workers and actors go with its raylet)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._node is not None:
            self._node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            self._node = None


def head_cluster_id(address: str, timeout_s: float = 5.0) -> str | None:
    """The cluster id the GCS at `address` answers with, or None when it does not answer (a TCP
    check first: Ray's client would wait 40 s for a GCS that is not there)."""
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=min(1.0, timeout_s)).close()
    except OSError:
        return None
    found: list[str] = []

    def ask() -> None:
        from ray._raylet import GcsClient

        try:
            found.append(GcsClient(address=address).cluster_id.hex())
        except Exception:
            pass

    t = threading.Thread(target=ask, daemon=True, name="tellodb-head-check")
    t.start()
    t.join(timeout_s)
    return found[0] if found else None


class LogForwarder(threading.Thread):
    """Print the logs of this driver's own actors (its job) as Ray's driver would, but pause
    between polls while the GCS is away instead of spinning (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="tellodb-actor-logs")
        self._stop = threading.Event()

    def run(self) -> None:
        import ray
        from ray._private import worker
        from ray._raylet import GcsLogSubscriber

        w = worker.global_worker
        job = w.current_job_id.hex()
        subscriber = GcsLogSubscriber(address=w.gcs_client.address, worker_id=w.worker_id)
        try:
            subscriber.subscribe()
            while not self._stop.is_set():
                try:
                    data = subscriber.poll(timeout=1.0)
                except ray.exceptions.RpcError:
                    data = None
                if not data or not data.get("lines"):  # nothing, or (no GCS) an empty answer at once
                    self._stop.wait(1.0)
                    continue
                if data.get("job") in (job, None, ""):
                    worker.print_to_stdstream(data, ignore_prefix=False)
        except Exception as exc:  # the driver disconnected under it
            log.debug("actor log forwarding stopped: %s", exc)
        finally:
            subscriber.close()

    def stop(self) -> None:
        self._stop.set()
