"""The router's view of the cluster: Ray, the node actors and the placement of shards on them.

`Cluster.start()` is `tellodb serve`: it joins the configured Ray cluster (or starts a private
local one), the placement authority (node.authority) and one named node actor per configured node,
and waits until each has opened its shards. `Cluster.join()` is `tellodb router`: the authority and
the nodes already run elsewhere in the cluster; it finds them by name.

The request methods route by entity (entity -> shard -> node, by the authority's placement) and
fan out to every node when a request spans entities, merging by score. A node that does not own
a shard it is asked about (it moved, or is being handed over) says so; the router reads the
placement again and sends the request where it now belongs (`_routed`), so a move is invisible
to clients (Redis Cluster's MOVED, without a client-side redirect).

The head may go away (router.membership): requests go on from the cached placement; the
authority's handle is looked up again when it stops answering (`_find_authority`); and when the
head comes back as a new Ray cluster, `watch` joins it again and finds the authority and the
node actors by name. Whatever cannot be routed meanwhile answers 503 with Retry-After, never 500;
`ready()` says whether this router can route now (`/ready`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from node.control.authority import NotReady, PlacementError, UnknownNode
from node.actor import start_node_actor
from node.control.actor import start_authority
from node.names import AUTHORITY_NAME as AUTHORITY, NAMESPACE, actor_name, authority
from node.errors import DeadlineExceeded, NodeError, NotOwnedError, StorageFull, TooFewReplicas, is_disk_full
from node.service import Node
from node.config import ClusterConfig, ConfigError
from node.ids import parse_memory_id
from node.ranking import best_first, oldest_first
from node.records import IngestItem
from node.control.placement import Placement
from router import ray_local
from router.coalesce import Coalescer
from router.errors import ApiError, Conflict, InsufficientStorage, NotFound, Unavailable

log = logging.getLogger("tellodb")
DEADLINE_MARGIN_S = 0.5  # a write must reach its commit this long before the router gives up on it
REJOIN_WAIT_S = 20.0  # a request waits this long (within its timeout) for a router joining the cluster again


SHARDS = object()  # in a fan-out's arguments: the shards the called node owns (Cluster._everywhere)
READS = frozenset({"query", "edges"})  # fan-out methods a follower copy may answer


class NodeDown(Unavailable):
    """A node's actor is gone (its machine, or a restart): the request may go elsewhere."""


class NodeSlow(Unavailable):
    """A node did not answer within the time given to it."""


class Moved(Exception):
    """A node does not own (or is handing over) a shard this router sent it: read the placement again."""


def set_node_environment() -> None:
    """Settings node actors inherit from the process that starts them (see Cluster.start)."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("MALLOC_ARENA_MAX", "2")):
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
                          "needs a new data directory (back it up and restore it into a cluster, README: Backups)")
    if config.replication == 1 and has(per_node):
        raise ConfigError(f"replication: {config.data_dir} holds replicated shards (nodes/); set replication back "
                          "to the value it was created with")


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.placement = Placement(config.shards, tuple(config.node_names))
        self.actors: dict[str, Any] = {}
        self.node_info: dict[str, dict] = {}
        self.coalescers: dict[tuple[str, str], Coalescer] = {}  # (node, method) -> merged Ray calls
        self.authority: Any = None  # the placement authority (node.authority)
        self.moved_retries = 0  # requests sent again after a node said a shard moved
        self.read_failovers = 0  # reads answered by (or tried on) a follower copy
        self._summary_cache: tuple[float, dict | None] = (0.0, None)
        self._refresh_lock = asyncio.Lock()
        self._owns_ray = False
        self._owns_nodes = False  # `tellodb serve` started its nodes; a router only uses them
        self.membership: Any = None  # router.membership.Membership of a `tellodb router`
        self.rejoining: str | None = None  # why this router is joining the cluster again, while it does
        self.rejoins = 0
        self.authority_up = True  # the authority answered the last check
        self._joined = asyncio.Event()
        self._joined.set()
        self._resolving: set[str] = set()  # nodes being looked up again (_reresolve)
        self._finding = False  # the authority is being looked up again
        self._lost: asyncio.Future | None = None  # set when this router loses the cluster (_answer)
        self._lookups = ThreadPoolExecutor(4, thread_name_prefix="tellodb-lookup")

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """`tellodb serve`: start (or join) Ray, the placement authority and every node actor here."""
        cfg = self.config
        # Node actors inherit these: no hub access, no tokenizer threads, no progress bars in logs.
        # MALLOC_ARENA_MAX: glibc gives each of a node's many threads (Chroma's runtimes, SQLite,
        # ONNX, Ray) its own heap arena by default, and the node's memory kept growing with them.
        set_node_environment()
        if not ray.is_initialized():
            started = time.monotonic()
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING,
                         log_to_driver=True)
            else:  # private: loopback only, token required (router/ray_local.py)
                ray.init(address="local", namespace=NAMESPACE, num_cpus=os.cpu_count() or 1,
                         include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                         object_store_memory=256 * 1024 * 1024, **ray_local.prepare(cfg.data_dir))
                self._owns_ray = True
            log.info("Ray ready address=%s cpus=%s seconds=%.1f", cfg.ray_address or "local",
                     ray.cluster_resources().get("CPU"), time.monotonic() - started)
        self._owns_nodes = True
        check_serve_layout(cfg)
        self.authority = start_authority(cfg.data_dir, cfg, movable=False)
        self.placement = ray.get(self.authority.placement.remote(), timeout=60)
        cpus = cfg.cpus_per_node or max(0.25, (ray.cluster_resources().get("CPU", 1.0)) / cfg.nodes)
        threads = max(1, int(cpus))
        log.info("Starting node actors nodes=%d shards=%d cpus_per_node=%.2g threads_per_node=%d",
                 cfg.nodes, cfg.shards, cpus, threads)
        started = time.monotonic()
        for name in self.placement.nodes:
            self._add_actor(name, start_node_actor(name, serve_node_config(cfg, name), self.placement, cpus, threads))
        infos = self._wait_for_nodes()
        ray.get([self.authority.join.remote(i["node"], {"pid": i["pid"]}) for i in infos])
        log.info("Shards placed shards=%d nodes=%d epoch=%d seconds=%.1f", cfg.shards, len(infos),
                 self.placement.epoch, time.monotonic() - started)
        self._register_old_free_ids()

    def join(self, wait_s: float = 600) -> None:
        """`tellodb router`: use the nodes of a running cluster (this process is already a Ray driver)."""
        deadline = time.monotonic() + wait_s
        self.authority = None
        while self.authority is None:
            self.authority = authority()
            if self.authority is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("no placement authority in the cluster: is `tellodb head` running?")
                time.sleep(0.5)
        self.placement = ray.get(self.authority.placement.remote(), timeout=60)
        while True:
            status = ray.get(self.authority.status.remote(), timeout=60)
            missing = [n for n in set(self.placement.owner) if not status["members"].get(n, {}).get("joined")]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {missing} have not joined within {wait_s:g} s")
            log.info("Waiting for nodes to join: %s", ", ".join(sorted(missing)))
            time.sleep(2)
        for name in sorted(set(self.placement.owner)):
            self._add_actor(name, ray.get_actor(actor_name(name), namespace=NAMESPACE))
        self._wait_for_nodes()
        log.info("Router joined the cluster nodes=%d shards=%d epoch=%d", len(self.actors), self.placement.shards,
                 self.placement.epoch)

    def _reresolve(self, name: str) -> None:
        """A node's actor died: if a new one runs under its name (a restarted `tellodb node`), use
        it. In the background, one look-up per node at a time, and none while the head is away
        (Ray's look-up would wait for it)."""
        if name in self._resolving or not self.authority_up:
            return
        self._resolving.add(name)

        async def look() -> None:
            try:
                actor = await self._lookup(actor_name(name))
                if actor is not None and (name not in self.actors or actor._actor_id != self.actors[name]._actor_id):
                    log.info("Node %s is a new actor now (it restarted)", name)
                    self._add_actor(name, actor)
            finally:
                self._resolving.discard(name)

        asyncio.get_running_loop().create_task(look())

    def _add_actor(self, name: str, actor: Any) -> None:
        self.actors[name] = actor
        for method in Node.MERGEABLE:
            self.coalescers[name, method] = Coalescer(
                lambda calls, actor=actor, method=method: actor.many.remote(method, calls))

    def _wait_for_nodes(self) -> list[dict]:
        names = list(self.actors)
        infos = ray.get([self.actors[n].info.remote() for n in names], timeout=600)
        for info in infos:
            self.node_info[info["node"]] = info
        first = infos[0]
        if first.get("model_file"):  # each node exports it if needed, one at a time (node.onnx_embedder)
            log.info("ONNX model ready path=%s seconds=%.1f", first["model_file"],
                     max(info["embedder_seconds"] for info in infos))
        log.info("Semantic embedder initialized model=%s dims=%d backend=%s device=%s threads=%d",
                 first["model"], first["dimension"], first["backend"], first["device"], first["threads"])
        for info in infos:
            log.info("Node ready node=%s pid=%s shards=%d open=%d reindexed=%d startup=%.1fs", info["node"],
                     info["pid"], info["shards_owned"], info["shards_open"], info["reindexed"],
                     info["startup_seconds"])
        return infos

    async def refresh_placement(self) -> Placement:
        """Read the placement again (a node said it does not own a shard); one read at a time. When
        the authority does not answer (the head is away) the cached placement stays."""
        async with self._refresh_lock:
            try:
                p = await asyncio.wait_for(self.authority.placement.remote(), 2.0)
            except Exception as exc:
                self.authority_up = False
                log.debug("placement not refreshed: %s", exc)
                await self._find_authority()
                return self.placement
            self.authority_up = True
            if p.epoch > self.placement.epoch:
                for name in set(p.owner) - set(self.actors):
                    actor = await self._lookup(actor_name(name))
                    if actor is not None:
                        self._add_actor(name, actor)
                log.info("Placement refreshed epoch=%d (was %d)", p.epoch, self.placement.epoch)
                self.placement = p
            return self.placement

    async def _lookup(self, name: str, timeout: float = 3.0) -> Any:
        """A named actor's handle, or None (not there, or the head does not answer in time). On a
        few threads of its own: a look-up the head does not answer can take long to give up."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._lookups, ray.get_actor, name, NAMESPACE), timeout)
        except Exception:
            return None

    async def _find_authority(self) -> None:
        """Look the authority up again by name (a restarted head runs a new one), when the head answers."""
        if self._finding or (self.membership is not None
                             and not await asyncio.to_thread(self.membership.head_answers)):
            return
        self._finding = True
        try:
            found = await self._lookup(AUTHORITY)
        finally:
            self._finding = False
        if found is not None and (self.authority is None or found._actor_id != self.authority._actor_id):
            log.info("Placement authority found again")
            self.authority = found

    # ---- membership: the head going away and coming back (router.membership) ---------------------

    def ready(self) -> tuple[bool, str | None]:
        """Whether this router can route requests now, and why not. Only while it joins the cluster
        again: with the head away it still routes by the last placement, and a shard without a live
        copy is the same for every router (a readiness probe that failed then would take them all
        out of service); `authority_up` and the cluster status say those."""
        if self.rejoining:
            return False, f"joining the cluster again ({self.rejoining})"
        return True, None

    async def watch(self) -> None:
        """Every second: is the authority there (and what does it report), and, for a `tellodb
        router`, is this process still part of the cluster (else join again)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.membership is not None:
                    reason = await asyncio.to_thread(self.membership.lost)
                    if reason is not None:
                        await self._rejoin(reason)
                        continue
                summary = await self.placement_summary(timeout=2.0, max_age_s=0.0)
                self.authority_up = summary is not None
                if summary is None:
                    await self._find_authority()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("cluster watch: %s", exc)

    async def _rejoin(self, reason: str) -> None:
        """Join the cluster again: a new Ray node here, then the authority and the nodes by name.
        Requests meanwhile wait a little (`_routed`), then answer 503."""
        self.rejoining = reason
        self._joined.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)  # calls waiting on the old cluster give up now (_answer)
        log.warning("Router lost the cluster (%s); joining again", reason)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.membership.leave)
            await asyncio.to_thread(self.membership.join)
            found, placement, actors = await asyncio.to_thread(self._find_cluster)
            self.authority = found
            if placement.epoch >= self.placement.epoch:  # a head that lost its disk starts lower: keep ours
                self.placement = placement
            self.actors.clear()  # handles of the old cluster's actors never work again
            self.coalescers.clear()
            for name, actor in actors.items():
                self._add_actor(name, actor)
            self._summary_cache = (0.0, None)
            self.rejoins += 1
            log.info("Router joined the cluster again seconds=%.1f epoch=%d nodes=%d", time.monotonic() - started,
                     self.placement.epoch, len(actors))
        finally:
            self.rejoining = None
            self._joined.set()

    def _find_cluster(self, wait_s: float = 120) -> tuple[Any, Placement, dict[str, Any]]:
        """(In a thread.) The authority, its placement, and the node actors that run now."""
        deadline = time.monotonic() + wait_s
        while (found := authority()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no placement authority after joining again")
            time.sleep(0.5)
        placement = ray.get(found.placement.remote(), timeout=60)
        actors = {}
        for name in sorted(placement.holders() | set(self.placement.holders())):
            try:
                actors[name] = ray.get_actor(actor_name(name), namespace=NAMESPACE)
            except ValueError:
                pass  # not started again yet: found when a call to it fails (`_reresolve`)
        return found, placement, actors

    async def _routed(self, attempt):
        """Run `attempt()` (which routes by the current placement) until it succeeds or the request's
        time is up: again after reading the placement each time a node answers that a shard moved
        or is down; and, while an attempt waits on a node that stopped answering, give it up as soon
        as the authority has handed that node's shards to followers (a failover)."""
        deadline = time.monotonic() + self.config.request_timeout_s
        delay = 0.01
        while True:
            if self.rejoining:
                try:
                    await asyncio.wait_for(self._joined.wait(), min(REJOIN_WAIT_S, max(0.01, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    raise Unavailable(f"this router is {self.ready()[1]}; retry the request") from None
            try:
                return await self._watched(attempt(), deadline)
            except (Moved, NodeDown) as exc:
                if time.monotonic() + delay > deadline or self.authority is None:
                    raise Unavailable(f"{exc}; the placement changed, retry the request") from None
                self.moved_retries += 1
                await asyncio.sleep(delay)
                await self.refresh_placement()
                delay = min(delay * 2, 0.25)

    async def _watched(self, work, deadline: float):
        """Await `work`; every second it takes, ask the authority whether a node is down and the
        placement moved on, and if so drop the attempt (NodeDown) so it is made again elsewhere."""
        task = asyncio.ensure_future(work)
        epoch = self.placement.epoch
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(0.01, min(1.0, deadline - time.monotonic())))
                if done:
                    return task.result()
                if time.monotonic() >= deadline or self.authority is None:
                    return await task
                summary = await self.placement_summary(timeout=1)
                if summary and summary["down"] and summary["epoch"] > epoch:
                    raise NodeDown(f"node {', '.join(summary['down'])} is down")
        finally:
            if not task.done():
                task.cancel()

    def _register_old_free_ids(self) -> None:
        """Shards written before free-form ids had homes (node.id_homes): record where their ids live."""
        found = dict(zip(self.actors, ray.get([a.unregistered_free_ids.remote() for a in self.actors.values()])))
        pairs = [(m, shard) for per_shard in found.values() for shard, ids in per_shard.items() for m in ids]
        by_home: dict[str, list[tuple[str, int]]] = {}
        for m, shard in pairs:
            by_home.setdefault(self._id_home_node(m), []).append((m, shard))
        ray.get([self.actors[node].register_homes.remote(p) for node, p in by_home.items()])
        ray.get([self.actors[node].mark_homes_registered.remote(list(per_shard))
                 for node, per_shard in found.items() if per_shard])
        if pairs:
            log.info("Registered the homes of free-form ids ids=%d", len(pairs))

    async def close(self) -> None:
        """Let every node this process started finish in-flight work and checkpoint its shards."""
        if not self.actors or not self._owns_nodes:
            return
        t = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(a.close.remote() for a in self.actors.values()), return_exceptions=True), 20)
        except asyncio.TimeoutError:
            log.warning("nodes did not close within 20 s")
        log.info("Nodes closed seconds=%.1f", time.monotonic() - t)

    def shutdown(self) -> None:
        """Stop the actors and Ray processes this engine started (call outside the event loop)."""
        if not self._owns_ray or not ray.is_initialized():
            return
        t = time.monotonic()
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
        ray.shutdown()
        log.info("Ray stopped seconds=%.1f", time.monotonic() - t)

    # ---- calls --------------------------------------------------------------------------------

    async def _call(self, node: str, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self.rejoining:
            raise NodeDown(f"this router is joining the cluster again; {node} is called once it has")
        if node not in self.actors:
            self._reresolve(node)
            raise NodeDown(f"{node} has not joined the cluster (again) yet; retry the request")
        coalescer = self.coalescers.get((node, method))
        call = coalescer.call(args) if coalescer else getattr(self.actors[node], method).remote(*args)
        timeout = timeout or self.config.request_timeout_s
        try:
            return await self._answer(call, timeout)
        except (asyncio.TimeoutError, GetTimeoutError):
            raise NodeSlow(f"{node} did not answer within {timeout:g} s") from None
        except NodeDown:
            raise
        except RayActorError:
            self._reresolve(node)
            raise NodeDown(f"{node} is down or restarting; retry the request") from None
        except (RayError, Exception) as exc:  # a Ray task error, or one a merged request got alone
            cause = exc
            while isinstance(cause, RayTaskError) and cause.cause is not None:  # a node's error, via other nodes
                cause = cause.cause
            if (isinstance(cause, RayError) and not isinstance(cause, RayTaskError)) or (
                    not isinstance(exc, RayTaskError) and type(cause).__module__.startswith("ray")):
                # Ray itself failed the call (its processes here or there are gone or restarting)
                self._reresolve(node)
                raise NodeDown(f"{node} could not be reached ({type(cause).__name__}); retry the request") from None
            if isinstance(cause, NotOwnedError):
                raise Moved(str(cause)) from None
            if isinstance(cause, NodeError):
                raise api_error(cause) from None
            if is_disk_full(cause):
                raise InsufficientStorage(f"{node}: the data volume is full") from None
            log.error("%s.%s failed: %s: %s", node, method, type(exc).__name__, exc)
            raise ApiError(f"{node} could not complete {method}") from None

    async def _answer(self, call, timeout: float) -> Any:
        """Await a Ray call for at most `timeout`, or until this router loses the cluster (a call to
        the old cluster never answers): then NodeDown, and `_routed` sends it again once joined."""
        lost = self._lost
        if lost is None or lost.done():
            lost = self._lost = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        if lost in done:
            raise NodeDown("this router lost the cluster (the head restarted); the request is sent again once "
                           "it has joined again")
        raise asyncio.TimeoutError()

    async def _everywhere(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every node that is the primary of shards, with SHARDS in `args`
        replaced by those shards (by this router's placement: during a move each shard is asked of
        one node only). For a read (`method` in READS), the shards of a node that does not answer
        within `read_failover_s` are asked of their followers instead."""
        read = method in READS

        async def one(node: str, shards: list[int]) -> list[Any]:
            bound = [shards if a is SHARDS else a for a in args]
            if not read or not any(self.placement.followers(s) for s in shards):
                return [await self._call(node, method, *bound)]
            try:
                return [await self._call(node, method, *bound, timeout=self.config.read_failover_s)]
            except (NodeSlow, NodeDown):
                self.read_failovers += 1
                by_follower: dict[str, list[int]] = {}
                for s in shards:
                    if not self.placement.followers(s):
                        raise
                    by_follower.setdefault(self.placement.followers(s)[0], []).append(s)
                return await asyncio.gather(*(self._call(f, method, *(part if a is SHARDS else a for a in args))
                                              for f, part in by_follower.items()))

        parts = await asyncio.gather(*(one(n, shards) for n, shards in self.placement.by_node().items()))
        return [answer for part in parts for answer in part]

    async def _read(self, shard: int, method: str, *args: Any) -> Any:
        """A read of one shard: from its primary, or from a follower when the primary does not
        answer within `read_failover_s` (reads of moved shards follow the placement, as writes do)."""
        async def attempt() -> Any:
            first, *others = self.placement.replicas[shard]
            if not others:
                return await self._call(first, method, *args)
            try:
                return await self._call(first, method, *args, timeout=self.config.read_failover_s)
            except (NodeSlow, NodeDown) as exc:
                failure: ApiError = exc
            for node in others:
                self.read_failovers += 1
                try:
                    return await self._call(node, method, *args, timeout=self.config.read_failover_s)
                except (NodeSlow, NodeDown) as exc:
                    failure = exc
            if isinstance(failure, NodeSlow):  # every copy is slow (a busy machine), none is gone: wait for one
                return await self._call(first, method, *args, timeout=self.config.request_timeout_s / 2)
            raise failure

        return await self._routed(attempt)

    async def ingest(self, items: list[IngestItem]) -> list[str | None]:
        """Store validated items, each placed on its entity's shard. Returns, in the order given, None for each
        stored item and the matched id for each one dropped as a near-duplicate.

        Items with `<entity>::...` ids go to their shard's node. A free-form id may have been
        written before under another entity: such items go to the node of the id's home shard,
        which moves the id in one operation (node.id_homes), so an id always names one memory.
        A write not committed when the router's timeout is near is dropped by its node, not
        committed later (DEADLINE_MARGIN_S). Each node stores its part of a batch all-or-nothing;
        when one part fails, the items the engine named itself (`generated_id`, so new for sure)
        are deleted from the parts that were stored, and the first failure is raised: retrying a
        failed batch never duplicates them, and items with the caller's ids are upserts anyway.
        """
        deadline = time.time() + self.config.request_timeout_s - min(DEADLINE_MARGIN_S, self.config.request_timeout_s / 4)
        items = [it.placed(self.placement.shard_of(it.entity_id)) for it in items]
        return await self._routed(lambda: self._ingest(items, deadline))

    async def _ingest(self, items: list[IngestItem], deadline: float) -> list[str | None]:
        groups: dict[tuple[str, str], list[int]] = {}
        for i, it in enumerate(items):
            if parse_memory_id(it.memory_id).entity_prefix is None:
                key = (self._id_home_node(it.memory_id), "ingest_free")
            else:
                key = (self.placement.node_of_shard(it.shard), "ingest")
            groups.setdefault(key, []).append(i)
        answers = await asyncio.gather(*(self._call(node, method, [items[i] for i in group], deadline)
                                         for (node, method), group in groups.items()), return_exceptions=True)
        if any(isinstance(a, BaseException) for a in answers):
            stored = [(g, a) for g, a in zip(groups.values(), answers) if not isinstance(a, BaseException)]
            await self._take_back(items, stored)
            raise next(a for a in answers if isinstance(a, BaseException))
        duplicate_of: list[str | None] = [None] * len(items)
        for group, answer in zip(groups.values(), answers):
            for i, dup in zip(group, answer):
                duplicate_of[i] = dup
        return duplicate_of

    async def query(self, text: str | None, entity_id: str | None, limit: int,
                    window: tuple[int | None, int | None] | None = None,
                    prefixes: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
        """Best hits for `text` (within `window`), or without text the window's memories in time order."""
        if entity_id is not None:
            shard = self.placement.shard_of(entity_id)
            return await self._read(shard, "query", text, entity_id, shard, limit, window)
        parts = await self._routed(lambda: self._everywhere("query", text, None, SHARDS, limit, window, prefixes))
        hits = [h for part in parts for h in part]
        if text is None:
            hits.sort(key=oldest_first)
        else:
            hits.sort(key=best_first)
        return hits[:limit]

    async def edges(self, nodes: list[str], direction: str, edge_types: list[str] | None, per_node: int,
                    entity_id: str | None) -> list[dict[str, Any]]:
        """Edges touching `nodes`: from the entity's shard, or from every node (merged, newest first)."""
        if entity_id is not None:
            shard = self.placement.shard_of(entity_id)
            return await self._read(shard, "edges", entity_id, shard, nodes, direction, edge_types, per_node)
        parts = await self._routed(lambda: self._everywhere("edges", None, SHARDS, nodes, direction, edge_types,
                                                                     per_node))
        found = [e for part in parts for e in part]
        found.sort(key=lambda e: -e["timestamp_ms"])
        return found

    async def walk(self, root: str, direction: str, edge_types: list[str] | None, depth: int, breadth: int,
                   max_edges: int, max_nodes: int, entity_id: str | None) -> dict[str, Any]:
        """Breadth-first walk from `root`: `depth` hops, at most `breadth` edges followed per node and
        direction, stopping at `max_edges` edges or `max_nodes` nodes."""
        depth_of = {root: 0}
        edges: list[dict[str, Any]] = []
        seen_edges: set[tuple] = set()
        frontier = [root]
        for hop in range(1, depth + 1):
            if not frontier or len(edges) >= max_edges:
                break
            found = await self.edges(frontier, direction, edge_types, breadth, entity_id)
            in_frontier = set(frontier)
            followed: dict[str, int] = {}  # edges followed per frontier node, at most `breadth`
            next_frontier: list[str] = []
            for e in found:
                key = (e["source"], e["edge_type"], e["target"], e["memory_id"])
                if key in seen_edges:
                    continue
                if len(edges) >= max_edges:
                    break
                ends = [n for n in (e["source"], e["target"]) if n in in_frontier]
                if all(followed.get(n, 0) >= breadth for n in ends):
                    continue
                for n in ends:
                    followed[n] = followed.get(n, 0) + 1
                new = [n for n in (e["source"], e["target"]) if n not in depth_of]
                if len(depth_of) + len(new) > max_nodes:
                    continue
                seen_edges.add(key)
                edges.append({**e, "depth": hop})
                for n in new:
                    depth_of[n] = hop
                    next_frontier.append(n)
            frontier = next_frontier
        nodes = [{"id": n, "depth": d} for n, d in sorted(depth_of.items(), key=lambda x: (x[1], x[0]))]
        return {"root": root, "nodes": nodes, "edges": edges}

    async def analytics(self, entity_id: str, label: str, start_ms: int | None, end_ms: int | None,
                        bucket: str | None) -> dict[str, Any]:
        shard = self.placement.shard_of(entity_id)
        return await self._read(shard, "analytics", entity_id, shard, label, start_ms, end_ms, bucket)

    async def export_entity(self, entity_id: str, page: int = 500):
        """Yield an entity's memories page by page (its shard holds them all)."""
        shard = self.placement.shard_of(entity_id)
        after = 0
        while True:
            rows = await self._read(shard, "export_page", entity_id, shard, after, page)
            if not rows:
                return
            after = rows[-1]["rowid"]
            yield rows

    async def erase_entity(self, entity_id: str) -> dict[str, Any]:
        """Erase an entity on every node and shard; what was removed, per shard."""
        removed: dict[str, Any] = {}
        for part in await self._routed(lambda: self._everywhere("erase", entity_id, SHARDS)):
            removed.update({str(s): counts for s, counts in part.items()})
        return removed

    def _home(self, memory_id: str) -> tuple[str, int] | None:
        """The node and shard where an `<entity>::<session>::<turn>` id lives; None for free-form ids."""
        prefix = parse_memory_id(memory_id).entity_prefix
        if prefix is None:
            return None
        shard = self.placement.shard_of(prefix)
        return self.placement.node_of_shard(shard), shard

    async def _take_back(self, items: list[IngestItem], stored: list[tuple[list[int], list]]) -> None:
        """Delete the stored items with engine-made ids of a batch whose other parts failed."""
        by_node: dict[str, list[tuple[str, int]]] = {}
        for group, answer in stored:
            for i, dup in zip(group, answer):
                it = items[i]
                if it.generated_id and dup is None:
                    by_node.setdefault(self.placement.node_of_shard(it.shard), []).append((it.memory_id, it.shard))
        results = await asyncio.gather(*(self._call(node, "delete_ids", pairs) for node, pairs in by_node.items()),
                                       return_exceptions=True)
        for node, result in zip(by_node, results):
            if isinstance(result, BaseException):
                log.error("a failed batch's items on %s could not be taken back: %s", node, result)

    async def inspect(self, memory_id: str, include_window: bool, radius: int) -> dict | None:
        home = self._home(memory_id)
        if home is not None:
            return await self._read(home[1], "inspect", memory_id, [home[1]], include_window, radius)
        return await self._routed(lambda: self._call(self._id_home_node(memory_id), "inspect_free", memory_id,
                                                     include_window, radius))

    async def delete(self, memory_id: str) -> bool:
        async def attempt() -> bool:
            home = self._home(memory_id)
            if home is not None:
                return await self._call(home[0], "delete", memory_id, [home[1]])
            return await self._call(self._id_home_node(memory_id), "delete_free", memory_id)

        return await self._routed(attempt)

    def _id_home_node(self, memory_id: str) -> str:
        """The node that records where a free-form id lives (node.id_homes)."""
        return self.placement.node_of_shard(self.placement.id_home(memory_id))

    async def profile(self, entity_id: str, recent: int) -> dict[str, Any] | None:
        shard = self.placement.shard_of(entity_id)
        return await self._read(shard, "profile", entity_id, shard, recent)

    async def snapshot(self, shard: int) -> dict[str, Any]:
        """A consistent copy of `shard` on its node (node.service.Node.snapshot)."""
        return await self._routed(lambda: self._call(self.placement.node_of_shard(shard), "snapshot", shard))

    async def read_snapshot(self, node: str, snapshot_id: str, offset: int, size: int) -> bytes:
        return await self._call(node, "read_snapshot", snapshot_id, offset, size)

    async def drop_snapshot(self, node: str, snapshot_id: str) -> None:
        try:
            await self._call(node, "drop_snapshot", snapshot_id)
        except ApiError as exc:  # it goes at the node's next start anyway
            log.warning("snapshot %s on %s not dropped: %s", snapshot_id, node, exc.message)

    # ---- the cluster's shape (node.authority) ------------------------------------------------------

    async def _ask_authority(self, method: str, *args: Any) -> Any:
        if self.rejoining:
            raise Unavailable(f"the placement authority cannot be asked now: this router is {self.ready()[1]}")
        if not self.authority_up:
            raise Unavailable("the placement authority does not answer (is `tellodb head` running?); moves and "
                              "member changes wait for it")
        try:
            return await asyncio.wait_for(getattr(self.authority, method).remote(*args), self.config.request_timeout_s)
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, NotReady):
                raise Unavailable(str(cause)) from None
            if isinstance(cause, UnknownNode):
                raise NotFound(str(cause)) from None
            if isinstance(cause, PlacementError):
                raise Conflict(str(cause)) from None
            raise ApiError(f"the placement authority could not complete {method}") from None
        except (asyncio.TimeoutError, RayError):
            self.authority_up = False
            await self._find_authority()
            raise Unavailable("the placement authority did not answer (is `tellodb head` running?); moves and "
                              "member changes wait for it") from None

    async def cluster_status(self) -> dict[str, Any]:
        """The authority's view (members, owners, moves) with each node's memories and bytes, and
        each shard's copies with their sequence numbers and lag (`shards_detail`, `under_replicated`)."""
        status = await self._ask_authority("status")
        per_node = await self.stats(timeout=10)
        await self._add_replication(status)
        for name, member in status["members"].items():
            stats = per_node.get(name)
            if stats is None and name not in self.actors and member["joined"]:
                self._reresolve(name)
            if stats is not None:
                member.update(memories=stats["memories"], answered=True,
                              bytes=sum(s.get("bytes", 0) for s in stats["per_shard"].values()))
            else:
                member["answered"] = False
        return status

    async def placement_summary(self, timeout: float, max_age_s: float = 0.5) -> dict[str, Any] | None:
        """Epoch, pending moves, nodes down, the last error (read at most every `max_age_s`, since
        every slow request asks); None when the authority does not answer."""
        cached_at, cached = self._summary_cache
        if cached is not None and time.monotonic() - cached_at < max_age_s:
            return cached
        try:
            summary = await asyncio.wait_for(self.authority.summary.remote(), timeout)
        except Exception:
            return None
        self._summary_cache = (time.monotonic(), summary)
        return summary

    async def _add_replication(self, status: dict[str, Any]) -> None:
        names = sorted({n for copies in status["replicas"] for n in copies if n in self.actors})

        async def one(name: str) -> dict | None:
            try:
                return await asyncio.wait_for(self.actors[name].replication_status.remote(), 5)
            except RayActorError:
                self._reresolve(name)
                return None
            except Exception:
                return None

        found = dict(zip(names, await asyncio.gather(*(one(n) for n in names))))
        detail, under = [], []
        for shard, copies in enumerate(status["replicas"]):
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
                             "lag": 0 if in_step else link.get("lag")})
            lags = [r["lag"] for r in rows[1:]]
            lag = None if any(x is None for x in lags) else max(lags, default=0)
            # Under-replicated: a copy missing or not live (down, catching up, being re-seeded). A live
            # copy's lag is the push in flight: writes wait for it, so it is not a missing copy.
            if len(copies) < status["replication"] or not all(r["live"] for r in rows):
                under.append(shard)
            detail.append({"shard": shard, "primary": copies[0], "seq": seq, "lag": lag, "copies": rows})
        status["shards_detail"], status["under_replicated"] = detail, under

    async def add_node(self, name: str) -> dict[str, Any]:
        return await self._ask_authority("add_node", name)

    async def remove_node(self, name: str) -> dict[str, Any]:
        return await self._ask_authority("remove_node", name)

    def merged_calls(self) -> dict[str, dict[str, int]]:
        """Per node method: Ray calls made and the requests they carried (router.coalesce)."""
        return {f"{node}.{method}": {"calls": c.calls, "requests": c.requests}
                for (node, method), c in self.coalescers.items()}

    async def stats(self, timeout: float | None = None) -> dict[str, dict | None]:
        """Per-node stats; a node that does not answer within `timeout` maps to None."""

        async def one(node: str) -> dict | None:
            try:
                return await asyncio.wait_for(self._call(node, "stats"), timeout)
            except (Unavailable, asyncio.TimeoutError):
                return None

        names = list(self.actors)
        return dict(zip(names, await asyncio.gather(*(one(n) for n in names))))


def api_error(exc: NodeError) -> ApiError:
    """The API error a node's failure means for the client."""
    if isinstance(exc, StorageFull):
        return InsufficientStorage(str(exc))
    if isinstance(exc, DeadlineExceeded):
        return Unavailable(f"{exc} (retry; with a memory_id a retry is an upsert)")
    if isinstance(exc, NotOwnedError):
        return Unavailable(f"{exc}; the placement changed, retry the request")
    if isinstance(exc, TooFewReplicas):
        return Unavailable(f"{exc} (retry; with a memory_id a retry is an upsert)")
    return ApiError(str(exc))
