"""A role's membership of the Ray cluster: join, notice that it was lost, join again.

Why a role restarts its own Ray node instead of waiting: Ray's GCS (on the head) holds the
cluster's identity. A head that comes back without GCS fault tolerance (no Redis) is a new Ray
cluster with a new id, and every raylet of the old one exits when it reconnects to it ("GCS
returned an authentication error"); a worker cannot move to another cluster. What survives is
what this process owns outside Ray: the node's data directory, its name, its last placement
(node.control.placement_file) and, for a router, its cached placement. So `Membership` notices the loss
(one of its Ray processes exited, or the head answers with another cluster id), stops what is
left (`leave`) and starts a new Ray node on the same slot (`join`); the role then starts its
node actor again on the same name and data (router.roles).

With GCS fault tolerance (Redis) the head comes back as the same cluster: nothing is lost, and
actors go on. Either way the Ray processes here wait `head_outage_s` for the head
(router.ray_node.tolerate_head_outage) and keep serving from what they hold meanwhile.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from typing import Callable

from router import tuning
from router.ray_node import LogForwarder, RayNode, head_cluster_id

log = logging.getLogger("tellodb")


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


class Stopped(Exception):
    """The role was asked to stop while it waited for the cluster."""


class Membership:
    """This process's Ray node (`make_node` builds a fresh one for each join) and driver."""

    def __init__(self, make_node: Callable[[], RayNode], head: str, namespace: str) -> None:
        self.make_node = make_node
        self.head = head  # host:port of the head's GCS
        self.namespace = namespace
        self.node: RayNode | None = None
        self.joins = 0
        self._logs: LogForwarder | None = None
        self._checked = 0.0
        # Between leave and join, a Ray call from another thread would otherwise start a private
        # local Ray here (Ray's auto-init): it must fail instead.
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False

    def join(self, stop: threading.Event | None = None, wait_s: float | None = None) -> str:
        """Start a Ray node here and connect this process to it, once the head answers (waiting
        `wait_s`, forever when None, and ending early with Stopped when `stop` is set)."""
        started = time.monotonic()
        while head_cluster_id(self.head) is None:
            if stop is not None and stop.is_set():
                raise Stopped()
            if wait_s is not None and time.monotonic() - started > wait_s:
                raise RuntimeError(f"the head at {self.head} did not answer within {wait_s:g} s")
            if stop is not None:
                stop.wait(1.0)
            else:
                time.sleep(1.0)
        node = self.make_node()
        self.node = node
        handlers = _signal_handlers()
        address = node.start()
        node.connect(self.namespace)
        _restore(handlers)  # ray.init sets a SIGTERM handler of its own on the main thread
        self._logs = LogForwarder()
        self._logs.start()
        self.joins += 1
        self._checked = time.monotonic()
        return address

    def lost(self) -> str | None:
        """Why this process is no longer part of the cluster, or None while it is (or while the
        head is away: the Ray processes here wait for it)."""
        node = self.node
        if node is None:
            return "not joined"
        pid = node.exited()
        if pid is not None:
            return f"Ray process {pid} exited"
        now = time.monotonic()
        if now - self._checked < tuning.HEAD_CHECK_EVERY_S:
            return None
        self._checked = now
        found = head_cluster_id(self.head, timeout_s=3.0)
        if found is not None and node.cluster_id is not None and found != node.cluster_id:
            return "the head came back as a new Ray cluster (it ran without GCS fault tolerance)"
        return None

    def head_answers(self) -> bool:
        return head_cluster_id(self.head, timeout_s=3.0) is not None

    def disconnect(self) -> None:
        """End this process's Ray driver, on the thread that calls it (a router's event loop: see
        router.cluster.Cluster._rejoin). While Ray shuts its driver down, any other use of it in
        this process ends the process (Ray: "the core worker has already been shutdown... The
        process will exit"): a call, or a reference to a result being dropped, which garbage
        collection can do on any thread; so that is paused meanwhile."""
        import ray

        if self._logs is not None:
            self._logs.stop()
            self._logs = None
        collecting = gc.isenabled()
        gc.disable()
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            if collecting:
                gc.enable()

    def leave(self) -> None:
        """Disconnect and stop this process's Ray processes (quick, also when the head is away)."""
        self.disconnect()
        if self.node is not None:
            self.node.stop()
            self.node = None
