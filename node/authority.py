"""The placement authority: the cluster's one record of which node owns which shard, at which epoch.

One Ray actor (`node.names.AUTHORITY_NAME`), started by `tellodb head` on the head machine (and by
`tellodb serve` inside its own tree), keeps the placement in `<data_dir>/placement.json`, so it
survives a restart of the head, and changes it only here:

- members: `add_node` / `remove_node` change who should own shards; the shards then travel one
  at a time to where the consistent-hash ring puts them (`Placement.moves`), so about 1/N of
  them move on an add, and a removed node's shards spread over the others;
- a move (`_move`) copies the shard while both copies serve nothing new: the target pulls a
  snapshot and the change log after it (node.moves), the source fences writes to that shard
  alone, the target applies the last changes, the owner flips at a new epoch and is saved before
  anyone is told, and only then does the source delete its copy. A failure before the flip rolls
  back (the target's copy dropped, the source unfenced) and is reported; the flip is the one
  point of no return, so a shard always has exactly one owner.

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
  lifted), and the rebalance then starts the pending moves again from the start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from node import placement_file
from node.errors import NodeError
from node.names import NAMESPACE, actor_name
from node.ring import Placement

log = logging.getLogger("tellodb")

HISTORY = 50  # finished and failed moves kept for `status`


class PlacementError(NodeError):
    """A request to change the cluster that cannot be done as asked (the router answers 409)."""


class UnknownNode(PlacementError):
    """A node name that is not part of the cluster (the router answers 404)."""


class NotReady(PlacementError):
    """The authority cannot change the cluster yet (the router answers 503 with the reason)."""


class PlacementAuthority:
    def __init__(self, data_dir: str, shards: int, nodes: list[str], movable: bool = True, replication: int = 1,
                 failover_after_s: float = 3.0, rebuild_after_s: float = 600.0) -> None:
        self.path = Path(data_dir) / "placement.json"
        self.failover_after_s = failover_after_s
        self.rebuild_after_s = rebuild_after_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.movable = movable  # False in `tellodb serve`: its nodes share one data directory
        # True until the placement is known to be the cluster's: a head without placement.json (a
        # new cluster, or a lost disk) takes the highest epoch the joining nodes bring.
        self.recovering = movable and not self.path.exists()
        if self.path.exists() and movable:
            self._placement = Placement.from_json(json.loads(self.path.read_text()))
            if self._placement.shards != shards:
                raise PlacementError(f"shards: the cluster was created with {self._placement.shards} shards, "
                                     f"cluster.yaml says {shards}; the shard count cannot change")
        else:  # a new cluster; or `tellodb serve`, whose nodes share one data directory: cluster.yaml decides
            self._placement = Placement(shards, tuple(nodes), replication=replication)
            self._save()
        if self._placement.replication != replication:  # cluster.yaml changed it: copies are added or dropped
            p = self._placement
            self._set(Placement(p.shards, p.nodes, p.epoch + 1, replication=replication, replicas=p.replicas))
        self.joined: dict[str, dict[str, Any]] = {}  # node name -> what its process said at join
        self.moving: dict[int, dict[str, Any]] = {}  # shard -> the move in progress
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.error: str | None = None  # why the last rebalance stopped, until the next one starts
        self.moved_shards = 0
        self.moved_bytes = 0
        self._rebalance: asyncio.Task | None = None
        self._actors: dict[str, Any] = {}
        self.down_since: dict[str, float] = {}  # joined nodes not answering pings, since (monotonic)
        self.failovers: list[dict[str, Any]] = []  # primaries handed to followers, newest last (HISTORY kept)
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
        """The watcher runs from the first call (a restarted authority has no joins to wait for)."""
        if (self.movable or self._placement.replication > 1) and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def join(self, name: str, info: dict[str, Any], placement: Placement | None = None) -> Placement:
        """A `tellodb node` process is up as the home of `name`; it opens the shards the placement
        gives it. `placement`: the newest one the node has seen (kept on its disk)."""
        self._actors.pop(name, None)
        self.settled.add(name)  # a new actor: no move of an earlier authority is left half-done there
        await self._member_found(name, info, placement)
        if placement is None or placement.epoch < self._placement.epoch:
            await self._push_to(name)
        return self._placement

    async def _push_to(self, name: str) -> None:
        try:
            await asyncio.wait_for(self._actor(name).set_placement.remote(self._placement, tuple(self.down_since)), 10)
        except Exception as exc:
            log.warning("placement epoch %d not pushed to %s: %s", self._placement.epoch, name, exc)

    async def _member_found(self, name: str, info: dict[str, Any], placement: Placement | None) -> None:
        """A node joined, or (GCS fault tolerance) its actor was found running after this authority restarted."""
        if (placement is not None and placement.shards == self._placement.shards
                and placement.epoch > self._placement.epoch):
            log.warning("Placement taken from node %s epoch=%d (this authority had %d)", name, placement.epoch,
                        self._placement.epoch)
            self._placement = placement
            self._save()
        self.joined[name] = {**info, "joined_at": time.time()}
        self.down_since.pop(name, None)
        self._ensure_watching()
        log.info("Node joined name=%s member=%s", name, name in self._placement.nodes)
        self._check_recovered()
        await self._settle(name)
        if self._placement.moves() and (self._rebalance is None or self._rebalance.done()) and (
                not self.error or self.paused):
            self._start_rebalance()  # a move interrupted by a restart goes on

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
            done = await asyncio.wait_for(self._actor(name).settle.remote(self._placement, tuple(self.moving)), 30)
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
        import ray

        for name in sorted(self._expected() - set(self.joined)):
            try:
                actor = await asyncio.to_thread(ray.get_actor, actor_name(name), NAMESPACE)
                await asyncio.wait_for(actor.ping.remote(), 2.0)
                placement = await asyncio.wait_for(actor.get_placement.remote(), 5.0)
            except Exception:
                continue
            self._actors[name] = actor
            await self._member_found(name, {"found_running": True}, placement)

    async def leave(self, name: str) -> None:
        self.joined.pop(name, None)
        self._actors.pop(name, None)

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
        if name not in self._placement.nodes:
            self._set(self._placement.with_nodes((*self._placement.nodes, name)))
            log.info("Node added name=%s epoch=%d moves=%d", name, self._placement.epoch, len(self._placement.moves()))
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
        if name in p.nodes:
            self._set(p.with_nodes(tuple(n for n in p.nodes if n != name)))
            log.info("Node removed name=%s epoch=%d moves=%d", name, self._placement.epoch,
                     len(self._placement.moves()))
        return self._start_rebalance()

    def _check_movable(self) -> None:
        if not self.movable:
            raise PlacementError("`tellodb serve` runs every node in one data directory, so shards cannot move "
                                 "between them; run `tellodb head`, `tellodb node` and `tellodb router` for a "
                                 "cluster that grows (README: Many machines)")

    def _start_rebalance(self) -> dict[str, Any]:
        if self._rebalance is None or self._rebalance.done():
            self.error = None
            self._rebalance = asyncio.get_running_loop().create_task(self._run_rebalance())
        return self._summary()

    async def _run_rebalance(self) -> None:
        """Move shards to their ring node, one at a time, until none is left or one fails."""
        self.paused = False
        await self._unfence_all()
        while True:
            moves = self._placement.moves()
            if not moves:
                return
            if self.recovering:
                self.error, self.paused = "waiting for the nodes to rebuild the placement", True
                return
            shard, source, target = moves[0]
            primary = self._placement.owner[shard]
            missing = [n for n in (primary, target) if n is not None and (n not in self.joined or n in self.down_since)]
            if missing:
                self.error = f"waiting for node {missing[0]!r} to join (or answer) before moving shard {shard}"
                self.paused = True
                log.warning("Rebalance paused: %s", self.error)
                return
            try:
                await self._move(shard, source, target)
            except Exception as exc:
                self.error = f"moving shard {shard} from {source} to {target} failed: {exc}"
                log.error("Rebalance stopped: %s", self.error)
                return

    async def _unfence_all(self) -> None:
        """Undo fences a stopped authority may have left behind (unfence is idempotent)."""
        for shard, _, _ in self._placement.moves():
            primary = self._placement.owner[shard]
            if primary in self.joined:
                try:
                    await self._actor(primary).unfence.remote(shard)
                except Exception:  # the node may be gone; it has no fence then
                    pass

    # ---- one move -----------------------------------------------------------------------------

    def _actor(self, name: str):
        if name not in self._actors:
            import ray

            if not ray.is_initialized():  # get_actor would start a local Ray of its own
                raise RuntimeError("Ray is not running")
            self._actors[name] = ray.get_actor(actor_name(name), namespace=NAMESPACE)
        return self._actors[name]

    async def _move(self, shard: int, source: str | None, target: str | None) -> None:
        """Move the copy of `shard` on `source` to `target` (None: add a copy on `target`, or drop the
        one on `source`). The data always comes from the primary, the one copy that is surely current.
        Writes pause (a fence on the primary) only when the primary itself leaves; a new follower
        needs none, since the primary pushes it every change after its own sequence number."""
        primary_name = self._placement.owner[shard]
        primary = self._actor(primary_name)
        move = {"shard": shard, "from": source, "to": target, "state": "copying", "started_at": time.time()}
        self.moving[shard] = move
        started = time.perf_counter()
        flipped = fenced_primary = False
        if target is None:  # a copy to drop: the placement first, then the files
            self._set(self._placement.with_copy_dropped(shard, source))
            await self._push()
            await self._release(shard, source, move)
            move.update(state="done", seconds=round(time.perf_counter() - started, 3), bytes=0, memories=0,
                        fence_ms=0.0)
            self._finish(move)
            return
        dst = self._actor(target)
        try:
            copied = await dst.receive_shard.remote(shard, primary_name)
            move.update(state="catching up", bytes=copied.get("bytes", 0), memories=copied.get("memories", 0),
                        copy_seconds=round(time.perf_counter() - started, 3),
                        index_seconds=copied.get("index_seconds"))
            fenced = time.perf_counter()
            if source == primary_name:
                move["state"] = "fenced"
                await primary.fence.remote(shard)
                fenced_primary = True
            seq = await dst.catch_up.remote(shard, primary_name)
            placement = (self._placement.with_copy_added(shard, target) if source is None
                         else self._placement.with_copy_moved(shard, source, target))
            self._set(placement)
            flipped = True
            await dst.adopt.remote(shard)
            move["fence_ms"] = round((time.perf_counter() - fenced) * 1000, 1) if fenced_primary else 0.0
            move["seq"] = seq
        except BaseException as exc:
            move.update(state="failed", error=str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
            await self._roll_back(shard, primary_name, source, target, flipped)
            self._finish(move)
            raise
        await self._push()
        if source is not None:
            await self._release(shard, source, move)
        move.update(state="done", seconds=round(time.perf_counter() - started, 3))
        self.moved_shards += 1
        self.moved_bytes += move.get("bytes", 0)
        log.info("Shard moved shard=%d from=%s to=%s bytes=%s fence_ms=%s seconds=%s epoch=%d", shard, source,
                 target, move.get("bytes"), move.get("fence_ms"), move["seconds"], self._placement.epoch)
        self._finish(move)

    async def _release(self, shard: int, source: str, move: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(self._actor(source).release.remote(shard), 60)
        except Exception as exc:  # the placement is right; a leftover copy on the source is only disk
            log.warning("shard %d: the old copy on %s was not deleted: %s", shard, source, exc)
            move["warning"] = f"old copy on {source} not deleted"

    async def _roll_back(self, shard: int, primary: str, source: str | None, target: str, flipped: bool) -> None:
        if flipped:  # the target took over on paper but not in fact: the copies stay where they were
            p = self._placement
            copies = tuple(n for n in p.replicas[shard] if n != target)
            if source is not None and source not in copies:
                copies = (source, *copies) if source == primary else (*copies, source)
            self._set(p._with_replicas(shard, copies))
        for name, method in ((target, "abort_incoming"), (primary, "unfence")):
            try:
                await getattr(self._actor(name), method).remote(shard)
            except Exception as exc:
                log.warning("shard %d: %s.%s during roll-back failed: %s", shard, name, method, exc)
        await self._push()

    def _finish(self, move: dict[str, Any]) -> None:
        self.moving.pop(move["shard"], None)
        move["finished_at"] = time.time()
        self.history.append(move)

    async def _push(self) -> None:
        """Give every joined node the new placement (for the free-form ids they look up elsewhere)."""
        placement = self._placement
        names = [n for n in self.joined if n not in self.down_since]

        down = tuple(sorted(self.down_since))

        async def push(name: str) -> Any:
            return await asyncio.wait_for(self._actor(name).set_placement.remote(placement, down), 10)

        for name, result in zip(names, await asyncio.gather(*(push(n) for n in names), return_exceptions=True)):
            if isinstance(result, BaseException):
                log.warning("placement epoch %d not pushed to %s: %s", placement.epoch, name, result)

    # ---- health and failover --------------------------------------------------------------------

    PING_EVERY_S = 0.5
    LOOK_EVERY_S = 2.0

    async def _watch(self) -> None:
        """Ping every joined node; one silent for `failover_after_s` loses its primaries to followers,
        one silent for `rebuild_after_s` stops being a member (its copies are rebuilt elsewhere)."""
        while True:
            await asyncio.sleep(self.PING_EVERY_S)
            if time.monotonic() - self._looked_for > self.LOOK_EVERY_S and self._expected() - set(self.joined):
                self._looked_for = time.monotonic()
                await self._look_for_running_nodes()
            names = list(self.joined)
            results = await asyncio.gather(*(self._ping(n) for n in names))
            now = time.monotonic()
            for name, ok in zip(names, results):
                if ok:
                    if self.down_since.pop(name, None) is not None:
                        log.info("Node answers again name=%s", name)
                    continue
                since = self.down_since.setdefault(name, now)
                if since == now:
                    log.warning("Node not answering name=%s", name)
                if self.recovering:
                    continue  # no failover before every shard has a known copy
                if now - since >= self.failover_after_s and name in self._placement.owner:
                    try:
                        await self._fail_over(name)
                    except Exception as exc:
                        log.error("failover from %s failed: %s", name, exc)
                if (now - since >= self.rebuild_after_s and name in self._placement.nodes
                        and len(self._placement.nodes) > 1):
                    log.warning("Node away for %.0f s, its copies are rebuilt elsewhere name=%s", now - since, name)
                    self._set(self._placement.with_nodes(tuple(n for n in self._placement.nodes if n != name)))
                    self.error = None
                    self._start_rebalance()

    async def _ping(self, name: str) -> bool:
        """Whether `name` answers; one that answers with an older placement (it was silent when a
        newer one was pushed: paused, partitioned) is given the current one."""
        try:
            answer = await asyncio.wait_for(self._actor(name).ping.remote(), 1.0)
        except Exception:
            self._actors.pop(name, None)  # a restarted node is a new actor
            return False
        if answer.get("epoch", self._placement.epoch) < self._placement.epoch:
            await self._push_to(name)
        return True

    async def _fail_over(self, name: str) -> None:
        """Give each shard whose primary is `name` to its live follower with the highest sequence
        number (with synchronous replication it holds every acknowledged write)."""
        p = self._placement
        changed = []
        for shard in p.primaries_of(name):
            candidates = [n for n in p.followers(shard) if n in self.joined and n not in self.down_since]
            states = await asyncio.gather(*(self._copy_seq(n, shard) for n in candidates))
            live = [(seq, n) for n, seq in zip(candidates, states) if seq is not None]
            if not live:
                continue  # no copy answers: the shard waits for its primary
            seq, best = max(live)
            p = p.with_primary(shard, best)
            changed.append({"shard": shard, "from": name, "to": best, "seq": seq, "at": time.time(),
                            "epoch": p.epoch})
        if not changed:
            return
        self._set(p)
        self.failover_count += len(changed)
        self.failovers = (self.failovers + changed)[-HISTORY:]
        log.warning("Failover from=%s shards=%s epoch=%d", name, [c["shard"] for c in changed], p.epoch)
        await self._push()

    async def _copy_seq(self, name: str, shard: int) -> int | None:
        try:
            state = await asyncio.wait_for(self._actor(name).copy_state.remote(shard), 2.0)
            return int(state[0])
        except Exception:
            return None

    # ---- what the operator sees ---------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        p = self._placement
        return {"epoch": p.epoch, "nodes": list(p.nodes), "pending_moves": len(p.moves()),
                "moving": list(self.moving.values()), "error": self.error,
                "rebalancing": self._rebalance is not None and not self._rebalance.done(),
                "moved_shards": self.moved_shards, "moved_bytes": self.moved_bytes,
                "replication": p.replication, "down": sorted(self.down_since), "failovers": self.failover_count,
                "rejoining": sorted(self._expected() - set(self.joined)), "recovering": self.recovering}

    async def summary(self) -> dict[str, Any]:
        self._ensure_watching()
        return self._summary()

    async def status(self) -> dict[str, Any]:
        self._ensure_watching()
        p = self._placement
        owners = p.by_node()
        nodes = sorted(set(p.nodes) | p.holders() | set(self.joined))
        return {**self._summary(), "shards": p.shards, "owner": list(p.owner),
                "replicas": [list(r) for r in p.replicas], "recent_failovers": self.failovers[-10:],
                "members": {n: {"member": n in p.nodes, "joined": n in self.joined, "shards": owners.get(n, []),
                                "copies": p.shards_of(n), "up": n in self.joined and n not in self.down_since,
                                **{k: v for k, v in self.joined.get(n, {}).items() if k in ("host", "pid", "data_dir")}}
                            for n in nodes},
                "history": list(self.history)}
