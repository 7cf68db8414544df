"""The router's start in Ray: start, join or find the cluster's placement authority and node actors.

`start` is `tellodb serve`: it joins the configured Ray cluster (or starts a private local one,
router/ray_local.py), the placement authority (node.control.authority) and one named node actor per
configured node, and waits until each has opened its shards. `join` is `tellodb router`: this
process is already a Ray driver (router.membership) and the authority and the nodes run elsewhere;
it finds them by name. `find` does the same again after the router joined a new Ray cluster (the
head came back without GCS fault tolerance). All of it blocks: it runs before the event loop, or in
a thread of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import ray

from node.actor import start_node_actor
from node.control.actor import start_authority
from node.names import authority
from node.config import ClusterConfig, ConfigError
from node.names import NAMESPACE, actor_name
from node.control.placement import Placement
from router import ray_local
from router.node_client import node_infos, register_old_free_ids

log = logging.getLogger("tellodb")


@dataclasses.dataclass
class Found:
    """The cluster as this router found (or started) it."""

    authority: Any
    placement: Placement
    actors: dict[str, Any]  # node name -> actor handle
    infos: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # each node's info(), when waited for


def set_node_environment() -> None:
    """Settings node actors inherit from the process that starts them: no hub access, no tokenizer
    threads, no progress bars in logs. MALLOC_ARENA_MAX: glibc gives each of a node's many threads
    (Chroma's runtimes, SQLite, ONNX, Ray) its own heap arena by default, and the node's memory kept
    growing with them. OPENBLAS_NUM_THREADS/OMP_NUM_THREADS: NumPy's BLAS would start a thread per
    core in every node for the vector scans, small products where the threads cost more than they
    save and the nodes fight over the same cores (a whole-shard scan took 11 ms with them and 2 ms
    without, docs/benchmarks.md); the model sets its own threads (`threads` per node)."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("MALLOC_ARENA_MAX", "2"), ("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1")):
        os.environ.setdefault(var, value)


def serve_node_config(config: ClusterConfig, node: str) -> ClusterConfig:
    """A node's settings in `tellodb serve`. With one copy per shard every node keeps its shards in
    `<data_dir>/shards/` (so `nodes` can change between starts); with replicas each node needs a
    folder of its own, `<data_dir>/nodes/<node>/` (a shard has a copy in two of them)."""
    if config.replication == 1:
        return config
    return dataclasses.replace(config, data_dir=os.path.join(config.data_dir, "nodes", node))


def check_serve_layout(config: ClusterConfig) -> None:
    """Refuse to start `tellodb serve` on shards laid out for the other replication setting."""
    shared = os.path.join(config.data_dir, "shards")
    per_node = os.path.join(config.data_dir, "nodes")
    has = lambda path: os.path.isdir(path) and any(os.scandir(path))  # noqa: E731
    if config.replication > 1 and has(shared):
        raise ConfigError(f"replication: {config.data_dir} holds single-copy shards; replication > 1 on one machine "
                          "needs a new data directory (back it up and restore it into a cluster, docs/ops/backups.md)")
    if config.replication == 1 and has(per_node):
        raise ConfigError(f"replication: {config.data_dir} holds replicated shards (nodes/); set replication back "
                          "to the value it was created with")


def init_ray(cfg: ClusterConfig) -> bool:
    """Join the configured Ray cluster, or start a private local one; whether this process started
    Ray (and so stops it: router.cluster.Cluster.shutdown)."""
    if ray.is_initialized():
        return False
    started = time.monotonic()
    owns = not cfg.ray_address
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=True)
    else:  # private: loopback only, token required, only the processes the engine uses (router/ray_local.py)
        extra = ray_local.prepare(cfg.data_dir)
        ray.init(address=ray_local.start(os.cpu_count() or 1), namespace=NAMESPACE, logging_level=logging.WARNING,
                 log_to_driver=True, **extra)
    log.info("Ray ready address=%s cpus=%s seconds=%.1f", cfg.ray_address or "local",
             ray.cluster_resources().get("CPU"), time.monotonic() - started)
    return owns


def start(cfg: ClusterConfig) -> Found:
    """`tellodb serve` (Ray is up): the placement authority and every node actor, here."""
    check_serve_layout(cfg)
    found_authority = start_authority(cfg.data_dir, cfg, movable=False)
    placement = ray.get(found_authority.placement.remote(), timeout=60)
    cpus = cfg.cpus_per_node or max(0.25, (ray.cluster_resources().get("CPU", 1.0)) / cfg.nodes)
    threads = max(1, int(cpus))
    log.info("Starting node actors nodes=%d shards=%d cpus_per_node=%.2g threads_per_node=%d",
             cfg.nodes, cfg.shards, cpus, threads)
    started = time.monotonic()
    actors = {name: start_node_actor(name, serve_node_config(cfg, name), placement, cpus, threads)
              for name in placement.nodes}
    infos = wait_for_nodes(actors)
    ray.get([found_authority.join.remote(i["node"], {"pid": i["pid"]}) for i in infos])
    log.info("Shards placed shards=%d nodes=%d epoch=%d seconds=%.1f", cfg.shards, len(infos), placement.epoch,
             time.monotonic() - started)
    registered = register_old_free_ids(actors, lambda m: placement.node_of_shard(placement.id_home(m)))
    if registered:
        log.info("Registered the homes of free-form ids ids=%d", registered)
    return Found(found_authority, placement, actors, infos)


def join(wait_s: float = 600) -> Found:
    """`tellodb router`: the nodes of a running cluster, once the authority says each has joined."""
    deadline = time.monotonic() + wait_s
    found_authority = _wait_for_authority(deadline, "no placement authority in the cluster: is `tellodb head` running?")
    placement = ray.get(found_authority.placement.remote(), timeout=60)
    while True:
        status = ray.get(found_authority.status.remote(), timeout=60)
        missing = [n for n in set(placement.owner) if not status["members"].get(n, {}).get("joined")]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes {missing} have not joined within {wait_s:g} s")
        log.info("Waiting for nodes to join: %s", ", ".join(sorted(missing)))
        time.sleep(2)
    actors = {name: ray.get_actor(actor_name(name), namespace=NAMESPACE) for name in sorted(set(placement.owner))}
    infos = wait_for_nodes(actors)
    log.info("Router joined the cluster nodes=%d shards=%d epoch=%d", len(actors), placement.shards, placement.epoch)
    return Found(found_authority, placement, actors, infos)


def find(known: Placement, wait_s: float = 120) -> Found:
    """(After joining a new Ray cluster.) The authority, its placement, and the node actors that run
    now, of its placement's and of `known`'s nodes; a node not started again yet is found when a
    call to it fails (router.node_client.Nodes.reresolve)."""
    found_authority = _wait_for_authority(time.monotonic() + wait_s, "no placement authority after joining again")
    placement = ray.get(found_authority.placement.remote(), timeout=60)
    actors = {}
    for name in sorted(placement.holders() | known.holders()):
        try:
            actors[name] = ray.get_actor(actor_name(name), namespace=NAMESPACE)
        except ValueError:
            pass
    return Found(found_authority, placement, actors)


def _wait_for_authority(deadline: float, missing: str) -> Any:
    """The authority's handle once it runs; RuntimeError(`missing`) if it does not by `deadline`."""
    while (found := authority()) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(missing)
        time.sleep(0.5)
    return found


def wait_for_nodes(actors: dict[str, Any]) -> list[dict]:
    """Each node's info() once it has opened its shards (logged)."""
    infos = node_infos(actors, timeout=600)
    first = infos[0]
    if first.get("model_file"):  # each node exports it if needed, one at a time (node.onnx_embedder)
        log.info("ONNX model ready path=%s seconds=%.1f", first["model_file"],
                 max(info["embedder_seconds"] for info in infos))
    log.info("Semantic embedder initialized model=%s dims=%d backend=%s device=%s threads=%d",
             first["model"], first["dimension"], first["backend"], first["device"], first["threads"])
    for info in infos:
        log.info("Node ready node=%s pid=%s shards=%d open=%d reindexed=%d startup=%.1fs", info["node"],
                 info["pid"], info["shards_owned"], info["shards_open"], info["reindexed"], info["startup_seconds"])
    return infos


def stop(actors: dict[str, Any]) -> None:
    """Stop these node actors and the Ray this process started (outside the event loop)."""
    if not ray.is_initialized():
        ray_local.stop()
        return
    t = time.monotonic()
    for actor in actors.values():
        ray.kill(actor)
    ray.shutdown()
    ray_local.stop()
    log.info("Ray stopped seconds=%.1f", time.monotonic() - t)
