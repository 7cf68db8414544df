"""`tellodb head`, `tellodb node` and `tellodb router`: one engine over many machines, on Ray.

- head: the Ray head (GCS) of the cluster and the placement authority (node.control.authority), which
  keeps the placement in the head's data directory.
- node: this machine slot joins as the home of node NAME; its node actor is pinned here by the
  Ray node label `tellodb-node=NAME` and keeps its shards under the node's data directory, so a
  restart with the same NAME and directory resumes with its data.
- router: a stateless HTTP router on a raylet of its own (no CPUs), serving the same API as
  `tellodb serve`; run any number.

Each role blocks until SIGTERM or SIGINT, then stops what it started, by PID (router.ray_node).

Nodes and routers outlive the head (`head_outage_s`): they go on serving from what they hold, and
when the head is back as a new Ray cluster (no GCS fault tolerance) they join it again by
themselves (router.membership): a node starts its Ray node and its node actor again on the same
name and data, and joins the authority with the placement it last saw.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import threading
import time

from node.config import ClusterConfig, ConfigError, load_config, port_range
from node.names import NAMESPACE  # not node.actor: Ray is imported only once its settings are made
from router import datadir, tuning
from router.membership import Membership, Stopped
from router.serving import claim_data_dir, reserve_port, resolve_api_key, serve, setup_logging
from router.ray_node import (NODE_LABEL, ROLE_LABEL, LogForwarder, RayNode, RayTokenMissing, port_plan, temp_dir,
                             tolerate_head_outage, use_address, use_token)

log = logging.getLogger("tellodb")
DEFAULT_GCS_PORT = 6380


def _config(args: argparse.Namespace, **overrides: object) -> ClusterConfig:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in {**overrides, "TELLODB_RAY_PORT_RANGE": args.ray_port_range}.items()
                if v is not None})
    return load_config(args.config, env)


def _port_range(config: ClusterConfig, gcs_port: int | None = None) -> tuple[int, int] | None:
    """ray_port_range as (LOW, HIGH), checked to hold Ray's ports (router.ray_node.port_plan)."""
    ports = port_range(config.ray_port_range) if config.ray_port_range else None
    port_plan(ports, gcs_port)
    return ports


def _gcs_port(args: argparse.Namespace, config: ClusterConfig) -> int:
    """The head's GCS port: --port, else the first of ray_port_range, else 6380."""
    ports = port_range(config.ray_port_range) if config.ray_port_range else None
    port = args.port or (ports[0] if ports else DEFAULT_GCS_PORT)
    if ports and not ports[0] <= port <= ports[1]:
        raise ConfigError(f"--port: the GCS port {port} is outside ray_port_range {config.ray_port_range}")
    return port


def _stop_event() -> threading.Event:
    """An event SIGTERM and SIGINT set (the role then stops what it started)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_for_stop(ray_node: RayNode) -> None:
    """Block until SIGTERM/SIGINT, or until this slot's Ray processes die (then exit non-zero)."""
    stop = _stop_event()
    while not stop.wait(2):
        pid = ray_node.exited()
        if pid is not None:
            raise RuntimeError(f"Ray process {pid} exited; stopping")


def _stop_on_signal() -> None:
    """Until a role is up, SIGTERM ends it through the normal `finally` clean-up."""
    def raise_exit(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, raise_exit)


def run_head(args: argparse.Namespace) -> int:
    import ray

    from node.control.actor import start_authority

    config = _config(args, TEMPORAL_MEMORY_DATA_DIR=args.data_dir)
    claim_data_dir(config)
    use_address(args.node_ip)
    # The head makes the cluster's token unless it is given one (a Kubernetes Secret, for example).
    use_token(args.ray_token_file, head_data_dir=None if args.ray_token_file else config.data_dir)
    _stop_on_signal()
    gcs_port = _gcs_port(args, config)
    ray_node = RayNode(args.node_ip, temp_dir(f"head:{os.path.abspath(config.data_dir)}"), head=True,
                       port=gcs_port, cpus=0, labels={ROLE_LABEL: "head"}, port_range=_port_range(config, gcs_port),
                       # GCS fault tolerance: Ray reads RAY_REDIS_ADDRESS itself; the password it takes as a
                       # parameter only, so it comes from Ray's own variable name here.
                       redis_password=os.environ.get("RAY_REDIS_PASSWORD") or None)
    try:
        address = ray_node.start()
        ray_node.connect(NAMESPACE)
        LogForwarder().start()  # the authority's log lines, in the head's log
        authority = start_authority(os.path.abspath(config.data_dir), config, movable=True,
                                    label_selector={ROLE_LABEL: "head"})
        placement = ray.get(authority.placement.remote(), timeout=tuning.AUTHORITY_CALL_S)
        log.info("Head ready address=%s shards=%d nodes=%s epoch=%d token_file=%s", address, placement.shards,
                 ",".join(placement.nodes), placement.epoch, os.environ["RAY_AUTH_TOKEN_PATH"])
        _wait_for_stop(ray_node)
        log.info("Head stopping")
    finally:
        ray_node.stop()
    return 0


def run_node(args: argparse.Namespace) -> int:
    """Join, serve, and join again each time the cluster is lost (the head came back as a new Ray
    cluster), until SIGTERM."""
    from router.ray_cluster import set_node_environment

    config = _config(args, TEMPORAL_MEMORY_DATA_DIR=args.data_dir)
    config = dataclasses.replace(config, data_dir=os.path.abspath(config.data_dir))
    claim_data_dir(config)
    check_model(config)
    use_address(args.node_ip)
    use_token(args.ray_token_file)
    tolerate_head_outage(config.head_outage_s)
    set_node_environment()
    _stop_on_signal()
    cpus = float(args.cpus or os.cpu_count() or 1)
    ports = _port_range(config)
    member = Membership(lambda: RayNode(args.node_ip, temp_dir(f"node:{config.data_dir}"), address=args.address,
                                        cpus=cpus, labels={ROLE_LABEL: "node", NODE_LABEL: args.name},
                                        port_range=ports),
                        args.address, NAMESPACE)
    stop = _stop_event()
    try:
        while not stop.is_set():
            served = _serve_node(args, config, cpus, member, stop)
            if served is None:
                break
            reason, pid = served
            log.warning("Node lost the cluster (%s); joining again name=%s", reason, args.name)
            member.leave()
            _reap(pid)
        log.info("Node stopping name=%s", args.name)
    except Stopped:
        log.info("Node stopping name=%s", args.name)
    finally:
        member.leave()
    return 0


def _serve_node(args: argparse.Namespace, config: ClusterConfig, cpus: float, member: Membership,
                stop: threading.Event) -> tuple[str, int | None] | None:
    """One membership: start Ray and the node actor, join the authority, then watch. Returns why
    the cluster was lost (and the old actor's PID), or None after a stop (with a clean close)."""
    import ray

    from node.control import placement_file
    from node.actor import start_node_actor
    from node.names import authority

    member.join(stop)
    kept = placement_file.load(placement_file.node_copy(config.data_dir))
    if kept is not None and kept.created_shards != config.shards:
        kept = None
    found = authority()
    if found is None and kept is not None:  # a rejoin: the node starts from its own copy while the head starts
        placement = kept
    else:
        found = found or _wait_for(authority, "the placement authority (is `tellodb head` running?)", stop=stop)
        placement = ray.get(found.placement.remote(), timeout=tuning.AUTHORITY_CALL_S)
        if placement.created_shards != config.shards:
            raise ConfigError(f"shards: the cluster was created with {placement.created_shards} shards, this node's config says "
                              f"{config.shards}")
        if kept is not None and kept.epoch > placement.epoch:
            placement = kept  # the head lost its placement (or has an older one): ours goes to it with the join
    actor = start_node_actor(args.name, config, placement, cpus, max(1, int(cpus)), {NODE_LABEL: args.name})
    info = ray.get(actor.info.remote(), timeout=tuning.NODE_START_S)
    found = found or _wait_for(authority, "the placement authority (is `tellodb head` running?)", stop=stop)
    me = {"host": args.node_ip, "pid": os.getpid(), "data_dir": config.data_dir, "actor_pid": info["pid"],
          **({"zone": args.zone} if getattr(args, "zone", None) else {})}
    ray.get(found.join.remote(args.name, me, ray.get(actor.get_placement.remote(), timeout=tuning.NODE_CALL_S)),
            timeout=tuning.AUTHORITY_CALL_S)
    log.info("Node ready name=%s shards=%d reindexed=%d member=%s data_dir=%s joins=%d", args.name,
             info["shards_owned"], info["reindexed"], args.name in placement.nodes, config.data_dir, member.joins)
    while not stop.wait(1.0):
        reason = member.lost()
        if reason is not None:
            return reason, info["pid"]
    if member.head_answers():  # a clean stop: the authority forgets this node, in-flight writes finish
        for call, timeout in ((found.leave.remote(args.name), 5), (actor.close.remote(), tuning.NODE_CLOSE_S)):
            try:
                ray.get(call, timeout=timeout)
            except Exception as exc:
                log.warning("node %s: %s", args.name, exc)
    else:  # the head is away: the shards checkpoint in close all the same
        try:
            ray.get(actor.close.remote(), timeout=tuning.NODE_CLOSE_S)
        except Exception as exc:
            log.warning("node %s: %s", args.name, exc)
    return None


def _reap(pid: int | None, grace_s: float = 5.0) -> None:
    """Wait for the node actor's old process (it ends with its raylet) so that no two processes
    hold the node's shards; SIGKILL it after `grace_s`."""
    if pid is None:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    log.warning("the node actor's old process %d did not end; killing it", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_router(args: argparse.Namespace) -> int:
    from router.cluster import Cluster

    config = _config(args, TEMPORAL_MEMORY_HOST=args.host, PORT=args.port)
    config = resolve_api_key(config)
    audit = os.path.abspath(datadir.audit_path(config.audit_file, config.data_dir, f"audit-router-{config.port}.log"))
    config = dataclasses.replace(config, audit_file=audit)
    datadir.make_private(os.path.dirname(os.path.abspath(audit)))
    use_address(args.node_ip)
    use_token(args.ray_token_file)
    tolerate_head_outage(config.head_outage_s)
    _stop_on_signal()
    ports = _port_range(config)
    socks = reserve_port(config)  # before Ray's processes start and take free ports
    member = Membership(lambda: RayNode(args.node_ip, temp_dir(f"router:{config.host}:{config.port}:{os.getpid()}"),
                                        address=args.address, cpus=0, labels={ROLE_LABEL: "router"},
                                        port_range=ports),
                        args.address, NAMESPACE)
    try:
        member.join(wait_s=tuning.JOIN_WAIT_S)
        cluster = Cluster(config)
        cluster.membership = member  # it joins again by itself when the cluster is lost (Cluster.watch)
        cluster.join()
        asyncio.run(serve(config, cluster, socks))
    finally:
        member.leave()
    return 0


def _wait_for(find, what: str, timeout_s: float = tuning.JOIN_WAIT_S, stop: threading.Event | None = None):
    deadline = time.monotonic() + timeout_s
    while (found := find()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout_s:g} s")
        if stop is not None and stop.wait(0.5):
            raise Stopped()
        time.sleep(0 if stop is not None else 0.5)
    return found


def check_model(config: ClusterConfig) -> None:
    """A node refuses to start, with the fix, when it could not embed (no torch and no export here)."""
    from node.config import normalized_backend
    from node.embedder import check_embedder

    check_embedder(config.embedding.model, normalized_backend(config), config.data_dir)


def run_role(args: argparse.Namespace) -> int:
    """Run one role with the exit codes of `tellodb serve` (2 configuration, 3 data directory busy,
    4 data directory of another engine), and 1 when the cluster cannot be reached."""
    setup_logging()
    runner = {"head": run_head, "node": run_node, "router": run_router}[args.command]
    try:
        return runner(args)
    except (ConfigError, RayTokenMissing) as exc:
        log.error("%s", exc)
        return 2
    except datadir.DataDirBusy as exc:
        log.error("%s", exc)
        return 3
    except datadir.DataDirMismatch as exc:
        log.error("%s", exc)
        return 4
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1


def add_parsers(sub) -> None:
    h = sub.add_parser("head", help="start the Ray head of a multi-machine cluster and its placement authority")
    h.add_argument("--port", type=int, help=f"Ray's GCS port that nodes and routers join (default: the first port of "
                   f"--ray-port-range, else {DEFAULT_GCS_PORT})")
    h.add_argument("--data-dir", required=True, help="where the placement and the cluster's Ray token are kept")
    n = sub.add_parser("node", help="join this machine to a cluster as the home of one node")
    n.add_argument("--address", required=True, help="the head, HOST:PORT")
    n.add_argument("--name", required=True, help="the node's name (a restart with the same name and data resumes)")
    n.add_argument("--data-dir", required=True, help="this node's shards")
    n.add_argument("--cpus", type=float, help="CPUs this node uses (default: all of this machine's)")
    n.add_argument("--zone", default=os.environ.get("TELLODB_ZONE") or None,
                   help="this machine's failure domain (a zone, a rack; default: $TELLODB_ZONE): the copies of a "
                        "shard go to distinct zones while there are as many zones as copies")
    r = sub.add_parser("router", help="a stateless HTTP router of a cluster (run any number)")
    r.add_argument("--address", required=True, help="the head, HOST:PORT")
    r.add_argument("--port", type=int, help="HTTP port (default: port in cluster.yaml, 3000)")
    r.add_argument("--host", help="bind address (default: host in cluster.yaml, 127.0.0.1)")
    for p in (h, n, r):
        p.add_argument("--config", help="cluster.yaml (default: $TELLODB_CONFIG, else built-in defaults)")
        p.add_argument("--ray-port-range", metavar="LOW-HIGH",
                       help="keep every port this role's Ray processes listen on inside LOW-HIGH, for firewalls and "
                            "NetworkPolicies: Ray's fixed ports (the head's GCS first), then its workers' (at least "
                            "16 ports; one per CPU and a few more; roles on one machine need ranges of their own; "
                            "default: ray_port_range, $TELLODB_RAY_PORT_RANGE, else any free port)")
        p.add_argument("--node-ip", default=os.environ.get("TELLODB_NODE_IP", "127.0.0.1"),
                       help="this machine's address in the cluster (default: $TELLODB_NODE_IP or 127.0.0.1, "
                            "which keeps every Ray port on loopback: one machine only)")
    for p in (n, r):
        p.add_argument("--ray-token-file", default=os.environ.get("TELLODB_RAY_TOKEN_FILE"),
                       help="a copy of the head's <data-dir>/ray_auth_token (default: $TELLODB_RAY_TOKEN_FILE)")
    h.add_argument("--ray-token-file", help="use this token file instead of making <data-dir>/ray_auth_token")
