"""Settings for the private Ray cluster `tellodb serve` starts when no `ray_address` is set.

Loopback only: Ray's servers (GCS, raylet's node and object managers, every worker, the agents
and the autoscaler monitor's metrics) listen on the node address, or on every interface whenever
that address is not loopback. On Linux Ray resolves even an explicit 127.0.0.1 to the machine's
network address unless its cluster mode is off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the
single-machine mode it uses on macOS and Windows), so both are set.

Token authentication (Ray 2.52+), set explicitly: `RAY_AUTH_MODE=token` with the token in
`<data_dir>/ray_auth_token` (0600, generated once, never logged) named by `RAY_AUTH_TOKEN_PATH`.
Ray's processes inherit the environment; Ray's own default would write `~/.ray/auth_token`.

Lean (`start`): the engine uses Ray for its actors and nothing else, so the private Ray starts
only what that needs: the GCS, the raylet (with the dashboard agent and the runtime env agent,
which the raylet requires) and the log monitor (it forwards the actors' log lines to the
engine's stderr). Not started: the autoscaler monitor (a fixed one-machine cluster) and the
dashboard's API server, which `ray.init` starts even with `include_dashboard=False` (for usage
statistics); together about 120 MiB of the engine's 905 MiB before its first request
(loadtest/results/serve-memory-2core.md). The roles (`tellodb head`, router.ray_node) keep Ray's
defaults. Nothing in the engine reads Ray's dashboard, its job API or its metrics: the router
exports its own (router/metrics.py).
"""

from __future__ import annotations

import atexit
import os
import secrets
import sys
from typing import Any

LOOPBACK = "127.0.0.1"
TOKEN_NAME = "ray_auth_token"
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # actors pass small objects; snapshots go in 4 MiB chunks
# What the private Ray starts, as Ray's RayParams: no autoscaler monitor; include_dashboard=False
# (and LeanHead below: no API server at all).
HEAD_PARAMS: dict[str, Any] = dict(node_ip_address=LOOPBACK, num_gpus=0, object_store_memory=OBJECT_STORE_BYTES,
                                   include_dashboard=False, no_monitor=True, include_log_monitor=True)
_head: Any = None  # the private Ray's head node this process started (stop())


def token_path(data_dir: str) -> str:
    """The engine's Ray token, created 0600 if missing."""
    path = os.path.abspath(os.path.join(data_dir, TOKEN_NAME))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def prepare(data_dir: str) -> dict:
    """Set the environment for a private, loopback-only, token-protected local Ray; returns the
    extra `ray.init` arguments. Call before `ray.init` (best before Ray is imported)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token_path(data_dir)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    if "ray._private.ray_constants" in sys.modules:  # Ray read these at import: refresh them
        import ray._private.ray_constants as ray_constants
        from ray._raylet import Config

        ray_constants.ENABLE_RAY_CLUSTER = False
        Config.initialize("")  # what Ray itself does after setting RAY_AUTH_MODE
    return {"_node_ip_address": LOOPBACK}


def start(cpus: float) -> str:
    """Start the private Ray's processes (after `prepare`); returns its GCS address, for `ray.init`.
    They share this process's fate: Ray kills them if it dies (kernel fate sharing on Linux)."""
    global _head
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    class LeanHead(Node):
        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            """Not started: with include_dashboard=False it would only report usage statistics.
            Ray runs on without it as when it fails to start (its URL stays None)."""

    _head = LeanHead(RayParams(num_cpus=cpus, **HEAD_PARAMS), head=True, shutdown_at_exit=False, spawn_reaper=True,
                     ray_init_cluster=True)
    atexit.register(stop)  # as ray.shutdown at exit does for a Ray that ray.init started
    return _head.gcs_address


def processes() -> dict[str, list[int]]:
    """The PIDs of the private Ray's processes by Ray's process type (empty when not started here)."""
    if _head is None:
        return {}
    return {kind: [p.process.pid for p in procs] for kind, procs in _head.all_processes.items()}


def stop() -> None:
    """Stop the private Ray's processes this process started, if any (after `ray.shutdown`)."""
    global _head
    head, _head = _head, None
    if head is not None:
        head.destroy_external_storage()
        head.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
