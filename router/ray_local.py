"""Settings for the private Ray cluster `tellodb serve` starts when no `ray_address` is set.

Loopback only: Ray's servers (GCS, raylet's node and object managers, every worker, the agents
and the autoscaler monitor's metrics) listen on the node address, or on every interface whenever
that address is not loopback. On Linux Ray resolves even an explicit 127.0.0.1 to the machine's
network address unless its cluster mode is off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the
single-machine mode it uses on macOS and Windows), so both are set.

Token authentication (Ray 2.52+), set explicitly: `RAY_AUTH_MODE=token` with the token in
`<data_dir>/ray_auth_token` (0600, generated once, never logged) named by `RAY_AUTH_TOKEN_PATH`.
Ray's processes inherit the environment; Ray's own default would write `~/.ray/auth_token`.
"""

from __future__ import annotations

import os
import secrets
import sys

LOOPBACK = "127.0.0.1"
TOKEN_NAME = "ray_auth_token"


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
