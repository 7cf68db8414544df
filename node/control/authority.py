"""The placement authority: the cluster's one record of which node owns which shard, at which epoch.

One Ray actor (`node.names.AUTHORITY_NAME`, created by node.control.actor), started by `tellodb head`
on the head machine (and by `tellodb serve` inside its own tree), keeps the placement in
`<data_dir>/placement.json`, so it survives a restart of the head, and changes it only here:

- members: `add_node` / `remove_node` change who should own shards (with `auto_rebalance` a node
  that joins becomes a member by itself, node.control.autobalance); the shards then travel one
  at a time to where the consistent-hash ring puts them (`Placement.moves`), so about 1/N of
  them move on an add, and a removed node's shards spread over the others (the move driver,
  node.control.rebalance);
- failover: a primary silent for `failover_after_s` is handed to a follower (node.control.failover);
- health: `status()` has each shard's copies, their sequence numbers and lag, and which shards are
  under-replicated (node.control.health).

Nodes register when their `tellodb node` process starts (`join`), routers read the placement
(`placement`) and read it again when a node answers that it does not own a shard (Redis
Cluster's MOVED). Nodes get each new placement pushed, for the ids they look up on other nodes,
and keep the last one on their own disk.

When the authority itself restarts (its head came back):
- with its data directory, it reads placement.json; nodes join again (a head without GCS fault
  tolerance is a new Ray cluster: each `tellodb node` starts its actor again, router.roles), or,
  with GCS fault tolerance, their actors still run and the watcher finds them by name;
- without it (the head's disk is gone), it *recovers*: the placement is rebuilt from the copies
  the nodes bring when they join, the highest epoch winning, and saved once every shard has a
  joined copy. Until then no move, failover or member change starts (NotReady, a 503);
- either way each node found is `settle`d once: a move the old authority left half-done is
  finished (a received copy the placement names is adopted) or undone (others dropped, fences
  lifted), and the rebalance then starts the pending moves again from the start, if a rebalance
  was asked for and had not finished, or with `auto_rebalance` (node.control.autobalance).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from node.control import health, placement_file
from node.control.autobalance import AutoBalance
from node.control.failover import Failover
from node.control.placement import Placement
from node.control.rebalance import MoveDriver
from node.control.splitting import SplitDriver
from node.control.errors import NotReady, PlacementError, UnknownNode
from node.names import Handles
from node.tuning import STATUS_HISTORY

log = logging.getLogger("tellodb")


class PlacementAuthority(MoveDriver, SplitDriver, Failover, AutoBalance):
    def __init__(self, data_dir: str, shards: int, nodes: list[str], movable: bool = True, replication: int = 1,
                 failover_after_s: float = 3.0, rebuild_after_s: float = 600.0, auto_rebalance: bool = False,
                 max_bytes_per_s: int = 0, max_shard_bytes: int = 0) -> None:
        self.path = Path(data_dir) / "placement.json"
        self.failover_after_s = failover_after_s
        self.rebuild_after_s = rebuild_after_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_auto(auto_rebalance, max_bytes_per_s)  # node.control.autobalance
        self.max_shard_bytes = max_shard_bytes  # node.control.splitting
        self.movable = movable  # False in `tellodb serve`: its nodes share one data directory
        # True until the placement is known to be the cluster's: a head without placement.json (a
        # new cluster, or a lost disk) takes the highest epoch the joining nodes bring.
        self.recovering = movable and not self.path.exists()
        saved = Placement.from_json(json.loads(self.path.read_text())) if self.path.exists() else None
        if saved is not None and (movable or (saved.created_shards, set(saved.nodes), saved.replication) ==
                                  (shards, set(nodes), replication)):
            # `tellodb serve` keeps its saved placement while cluster.yaml names the same nodes and copies:
            # with replicas each node has its own folder, and the copies are where that placement put them.
            self._placement = saved
            if self._placement.created_shards != shards:
                raise PlacementError(f"shards: the cluster was created with {self._placement.created_shards} shards, "
                                     f"cluster.yaml says {shards}; the shard count cannot change there "
                                     "(`tellodb cluster split` adds shards)")
        else:  # a new cluster; or `tellodb serve` with other nodes: cluster.yaml decides, but a split's
            # hash ranges stay (the shards on disk hold them; a restored backup of a split cluster brings them)
            split = saved if saved is not None and saved.created_shards == shards else None
            self._placement = Placement(split.shards if split else shards, tuple(nodes), replication=replication,
                                        ranges=split.ranges if split else (), created_shards=shards)
            self._save()
        if self._placement.replication != replication:  # cluster.yaml changed it: copies are added or dropped
            p = self._placement
            self._set(replace(p, epoch=p.epoch + 1, replication=replication, owner=()))
            self._want_rebalance(True)  # cluster.yaml asked for copies to be added or dropped
        self.joined: dict[str, dict[str, Any]] = {}  # node name -> what its process said at join
        self.moving: dict[int, dict[str, Any]] = {}  # shard -> the move in progress
        self.history: deque[dict[str, Any]] = deque(maxlen=STATUS_HISTORY)
        self.error: str | None = None  # why the last rebalance stopped, until the next one starts
        self.moved_shards = 0
        self.moved_bytes = 0
        self._rebalance: asyncio.Task | None = None
        self.handles = Handles()  # the nodes' actors
        self.down_since: dict[str, float] = {}  # joined nodes not answering pings, since (monotonic)
        self.failovers: list[dict[str, Any]] = []  # primaries handed to followers, newest last (STATUS_HISTORY kept)
        self.failover_count = 0
        self._watcher: asyncio.Task | None = None
        self.paused = False  # the rebalance waits for a node to join
        self.settled: set[str] = set()  # nodes told what this authority left or took over (Node.settle)
        self._looked_for = 0.0  # last search for running node actors that have not joined (monotonic)

    # ---- the record ---------------------------------------------------------------------------

    def _save(self) -> None:
        """Write the placement atomically; not while recovering (it is not known to be right yet)."""
        if not self.recovering:
            placement_file.save(self.path, self._placement)

    def _set(self, placement: Placement) -> None:
        self._placement = placement
        self._save()

    async def placement(self) -> Placement:
        self._ensure_watching()
        return self._placement

    def _ensure_watching(self) -> None:
        """The watcher runs from the first call (a restarted authority has no joins to wait for),
        and so does the size policy (node.control.splitting), in `tellodb serve` too."""
        self._ensure_size_policy()
        if (self.movable or self._placement.replication > 1) and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def join(self, name: str, info: dict[str, Any], placement: Placement | None = None) -> Placement:
        """A `tellodb node` process is up as the home of `name`; it opens the shards the placement
        gives it. `placement`: the newest one the node has seen (kept on its disk)."""
        self.handles.forget(name)
        self.settled.add(name)  # a new actor: no move of an earlier authority is left half-done there
        await self._member_found(name, info, placement)
        if placement is None or placement.epoch < self._placement.epoch:
            await self._push_to(name)
        return self._placement

    async def _push_to(self, name: str) -> None:
        try:
            await asyncio.wait_for(self.handles.get(name).set_placement.remote(self._placement, tuple(self.down_since)), 10)
        except Exception as exc:
            log.warning("placement epoch %d not pushed to %s: %s", self._placement.epoch, name, exc)

    async def _member_found(self, name: str, info: dict[str, Any], placement: Placement | None) -> None:
        """A node joined, or (GCS fault tolerance) its actor was found running after this authority restarted."""
        if (placement is not None and placement.created_shards == self._placement.created_shards
                and placement.epoch > self._placement.epoch):
            log.warning("Placement taken from node %s epoch=%d (this authority had %d)", name, placement.epoch,
                        self._placement.epoch)
            self._placement = placement
            self._save()
        self.joined[name] = {**info, "joined_at": time.time()}
        self.down_since.pop(name, None)
        zones = dict(self._placement.zones)
        if info.get("zone") and zones.get(name) != info["zone"]:  # copies of a shard go to distinct zones
            self._set(self._placement.with_zones({**zones, name: str(info["zone"])}))
            log.info("Node zone name=%s zone=%s moves=%d", name, info["zone"], len(self._placement.moves()))
        self._ensure_watching()
        log.info("Node joined name=%s member=%s", name, name in self._placement.nodes)
        self._check_recovered()
        await self._settle(name)
        self._auto_add()  # with auto_rebalance a joined node becomes a member (node.control.autobalance)
        idle = self._rebalance is None or self._rebalance.done()
        if self._placement.moves() and self._may_resume() and idle and (not self.error or self.paused):
            self._start_rebalance()  # a rebalance interrupted by a restart, or waiting for this node, goes on

    def _check_recovered(self) -> None:
        """Recovery ends (and the placement is saved) once every shard has a copy on a joined node."""
        p = self._placement
        if self.recovering and all(any(n in self.joined for n in p.replicas[s]) for s in range(p.shards)):
            self.recovering = False
            self._save()
            log.info("Placement confirmed by the nodes epoch=%d nodes=%s", p.epoch, ",".join(sorted(self.joined)))

    async def _settle(self, name: str) -> None:
        if name in self.settled:
            return
        try:
            done = await asyncio.wait_for(self.handles.get(name).settle.remote(self._placement, tuple(self.moving)), 30)
        except Exception as exc:
            log.warning("node %s not settled: %s", name, exc)
            return
        self.settled.add(name)
        if any(done.values()):
            log.info("Node settled name=%s %s", name, " ".join(f"{k}={v}" for k, v in done.items() if v))

    def _expected(self) -> set[str]:
        """The nodes the placement names (members and holders of copies)."""
        return set(self._placement.nodes) | self._placement.holders()

    async def _look_for_running_nodes(self) -> None:
        """A restarted authority (same Ray cluster, GCS fault tolerance) finds the node actors that
        still run: they joined the authority before it, and will not join again."""
        for name in sorted(self._expected() - set(self.joined)):
            try:
                actor = await asyncio.to_thread(self.handles.get, name, True)
                await asyncio.wait_for(actor.ping.remote(), 2.0)
                placement = await asyncio.wait_for(actor.get_placement.remote(), 5.0)
            except Exception:
                self.handles.forget(name)
                continue
            await self._member_found(name, {"found_running": True}, placement)

    async def leave(self, name: str) -> None:
        self.joined.pop(name, None)
        self.handles.forget(name)

    # ---- changing the members -----------------------------------------------------------------

    def _check_ready(self) -> None:
        if self.recovering:
            missing = sorted({s for s in range(self._placement.shards)
                              if not any(n in self.joined for n in self._placement.replicas[s])})
            raise NotReady(f"the placement is being rebuilt from the nodes (the head started without its "
                           f"placement.json): {len(missing)} shards have no joined copy yet; nodes "
                           f"{', '.join(sorted(self._expected() - set(self.joined)))} have not joined")

    async def add_node(self, name: str) -> dict[str, Any]:
        """Make a joined node a member; its share of shards moves to it in the background."""
        self._check_movable()
        if name not in self.joined:
            raise UnknownNode(f"node {name!r} has not joined: start `tellodb node --name {name}` first")
        self._check_ready()
        self._removed_by_operator(name, False)
        if name not in self._placement.nodes:
            self._set(self._placement.with_nodes((*self._placement.nodes, name)))
            log.info("Node added name=%s epoch=%d moves=%d", name, self._placement.epoch, len(self._placement.moves()))
        return self._start_rebalance()

    async def rebalance(self) -> dict[str, Any]:
        """Carry out the pending moves and handovers, with the members as they are (a cluster
        upgraded from the ring's placement, or one whose rebalance stopped on an error)."""
        self._check_movable()
        self._check_ready()
        return self._start_rebalance()

    async def remove_node(self, name: str) -> dict[str, Any]:
        """Drain every shard of a member to the others, then forget it."""
        self._check_movable()
        p = self._placement
        if name not in p.nodes and name not in p.holders():
            raise UnknownNode(f"node {name!r} is not a member of the cluster")
        if name in p.nodes and len(p.nodes) == 1:
            raise PlacementError(f"node {name!r} is the last member; it cannot be removed")
        self._check_ready()
        self._removed_by_operator(name, True)  # auto_rebalance does not make it a member again
        if name in p.nodes:
            self._set(p.with_nodes(tuple(n for n in p.nodes if n != name)))
            log.info("Node removed name=%s epoch=%d moves=%d", name, self._placement.epoch,
                     len(self._placement.moves()))
        return self._start_rebalance()

    def _check_movable(self) -> None:
        if not self.movable:
            raise PlacementError("`tellodb serve` runs every node in one data directory, so shards cannot move "
                                 "between them; run `tellodb head`, `tellodb node` and `tellodb router` for a "
                                 "cluster that grows (docs/ops/many-machines.md)")

    # ---- what the operator sees ---------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        p = self._placement
        return {"epoch": p.epoch, "nodes": list(p.nodes), "pending_moves": len(p.moves()),
                "pending_handovers": len(p.handovers()),
                "behind": [list(pair) for pair in p.behind],
                "moving": list(self.moving.values()), "error": self.error,
                "rebalancing": self._rebalance is not None and not self._rebalance.done(),
                "moved_shards": self.moved_shards, "moved_bytes": self.moved_bytes,
                "replication": p.replication, "down": sorted(self.down_since), "failovers": self.failover_count,
                "rejoining": sorted(self._expected() - set(self.joined)), "recovering": self.recovering,
                "auto_rebalance": self.auto_rebalance, "max_bytes_per_s": self.max_bytes_per_s,
                "shards": p.shards, "max_shard_bytes": self.max_shard_bytes,
                "paced_s": round(self.paced_s, 3)}

    async def summary(self) -> dict[str, Any]:
        self._ensure_watching()
        return self._summary()

    async def status(self) -> dict[str, Any]:
        """The summary, the placement, each member, the moves done, and replication health: each
        shard's copies with their seqs and lag (`shards_detail`) and the shards short of live
        copies (`under_replicated`), from the nodes' reports (node.control.health)."""
        self._ensure_watching()
        p = self._placement
        owners = p.by_node()
        nodes = sorted(set(p.nodes) | p.holders() | set(self.joined))
        found = await health.reports(self.handles, sorted(n for n in p.holders() if n in self.joined))
        detail, under = health.shard_health([list(r) for r in p.replicas], p.replication, found, set(self.joined),
                                            set(self.down_since))
        return {**self._summary(), "shards": p.shards, "owner": list(p.owner),
                "shards_detail": detail, "under_replicated": under,
                "replicas": [list(r) for r in p.replicas], "recent_failovers": self.failovers[-10:],
                "members": {n: {"member": n in p.nodes, "joined": n in self.joined, "shards": owners.get(n, []),
                                "copies": p.shards_of(n), "up": n in self.joined and n not in self.down_since,
                                **{k: v for k, v in self.joined.get(n, {}).items() if k in ("host", "pid", "data_dir")}}
                            for n in nodes},
                "history": list(self.history)}
