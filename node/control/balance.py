"""Where each shard's copies belong: every node within one copy (and one primary) of the mean, reached
from the current placement with the fewest copies moved.

`balance` is a pure function of the current copies, the members and their zones. Asked again after a
move it plans the rest as well (each move it proposes lowers the excess over the quotas by one), but
the engine keeps a plan until the members change (`Placement._same_plan`), and carries out the
primary handovers as a whole plan (asked again after each, they can go round). Three steps:

1. Keep what may stay: copies on members, one per zone while there are at least as many zones as
   copies (distinct nodes otherwise), at most `replication` of them; add the missing copies on the
   least loaded node that may take them.
2. Even out copies: each node's quota is the mean rounded down, and the nodes holding most today get
   the remainder's +1s (so a join takes about shards/N and nothing moves between old nodes); a node
   over its quota gives copies, followers first, to the node furthest under its own.
3. Even out primaries (with two copies or more): a shard's primary may be any of its copies, so
   primaries are balanced by choosing among them (a handover, no data copied): first direct swaps,
   then chains of them (augmenting paths) for what is left.

Ties are broken by the order of `nodes`, so the result is deterministic.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Mapping, Sequence

Copies = tuple[tuple[str, ...], ...]
MIX = 16  # candidates of the lowest load weighed for how few shards they share with a shard's copies


def quotas(counts: Mapping[str, int], total: int, rank: Mapping[str, int]) -> dict[str, int]:
    """Each node's share of `total`: the mean rounded down, +1 for the remainder's nodes, given to
    those that hold most now (fewest moves), ties by rank."""
    base, extra = divmod(total, len(counts))
    ordered = sorted(counts, key=lambda n: (-counts[n], rank[n]))
    return {n: base + (i < extra) for i, n in enumerate(ordered)}


class _Plan:
    def __init__(self, current: Sequence[Sequence[str]], nodes: Sequence[str], replication: int,
                 zones: Mapping[str, str] | None) -> None:
        if not nodes:
            raise ValueError("a placement needs at least one node")
        self.nodes = list(dict.fromkeys(nodes))
        self.rank = {n: i for i, n in enumerate(self.nodes)}
        self.zone = {n: (zones or {}).get(n) or f"node:{n}" for n in self.nodes}
        self.r = min(replication, len(self.nodes))
        self.by_zone = len(set(self.zone.values())) >= self.r  # else: distinct nodes only
        self.copies = [self._kept(c) for c in current]
        self.count = {n: 0 for n in self.nodes}
        for c in self.copies:
            for n in c:
                self.count[n] += 1

    def _kept(self, copies: Sequence[str]) -> list[str]:
        kept: list[str] = []
        for n in copies:
            if n in self.rank and n not in kept and (not self.by_zone or self.zone[n] not in map(self.zone.get, kept)):
                kept.append(n)
        return kept[:self.r]

    def may_take(self, node: str, shard: int, leaving: str | None = None) -> bool:
        others = [n for n in self.copies[shard] if n != leaving]
        if node in others:
            return False
        return not self.by_zone or self.zone[node] not in {self.zone[n] for n in others}

    def fill(self) -> None:
        """Add the missing copies, each on the least loaded node that may take it, and among those
        (up to `MIX` of them) the one sharing fewest shards with the shard's other copies: a node's
        followers then spread over many nodes (a lost node's load too, and a primary can be handed
        along a chain of them). A heap of nodes by load, so 16k shards on 1,000 nodes fill in seconds."""
        heap = [(self.count[n], self.rank[n], n) for n in self.nodes]
        heapq.heapify(heap)
        shared: dict[tuple[str, str], int] = {}
        for c in self.copies:
            for a in c:
                for b in c:
                    if a != b:
                        shared[a, b] = shared.get((a, b), 0) + 1
        for s, c in enumerate(self.copies):
            while len(c) < self.r:
                passed, fits = [], []
                while heap and len(fits) < MIX and (not fits or heap[0][0] == fits[0][0]):
                    item = heapq.heappop(heap)
                    (fits if self.may_take(item[2], s) else passed).append(item)
                best = min(fits, key=lambda i: (sum(shared.get((x, i[2]), 0) for x in c), i[1]))
                load, rank, n = best
                for x in c:
                    shared[x, n] = shared.get((x, n), 0) + 1
                    shared[n, x] = shared.get((n, x), 0) + 1
                c.append(n)
                self.count[n] += 1
                for item in (*passed, *(f for f in fits if f is not best), (load + 1, rank, n)):
                    heapq.heappush(heap, item)

    def even_copies(self) -> None:
        quota = quotas(self.count, sum(self.count.values()), self.rank)
        held: dict[str, list[int]] = {n: [] for n in self.nodes}
        for s, c in enumerate(self.copies):
            for n in c:
                held[n].append(s)
        while True:
            over = [n for n in self.nodes if self.count[n] > quota[n]]
            if not over:
                return
            src = max(over, key=lambda n: (self.count[n] - quota[n], -self.rank[n]))
            under = sorted((n for n in self.nodes if self.count[n] < quota[n]),
                           key=lambda n: (self.count[n] - quota[n], self.rank[n]))
            # followers first (no handover needed), then by shard number
            order = sorted(held[src], key=lambda s: (self.copies[s][0] == src, s))
            found = next(((s, dst) for s in order for dst in under if self.may_take(dst, s, leaving=src)), None)
            if found is None:
                return  # nothing may move (zones too few or too uneven): as even as it can be
            s, dst = found
            c = self.copies[s]
            c.remove(src)
            c.append(dst)  # as a move leaves it: the copy that arrives is a follower (Placement.with_copy_moved)
            held[src].remove(s)
            held[dst].append(s)
            self.count[src] -= 1
            self.count[dst] += 1

    def even_primaries(self) -> None:
        if self.r < 2:
            return
        led = {n: 0 for n in self.nodes}
        for c in self.copies:
            led[c[0]] += 1
        quota = quotas(led, len(self.copies), self.rank)

        def hand(s: int, to: str) -> None:
            c = self.copies[s]
            led[c[0]] -= 1
            led[to] += 1
            c.remove(to)
            c.insert(0, to)

        for s, c in enumerate(self.copies):  # direct swaps
            if led[c[0]] > quota[c[0]]:
                to = min((n for n in c[1:] if led[n] < quota[n]), key=lambda n: (led[n] - quota[n], self.rank[n]),
                         default=None)
                if to is not None:
                    hand(s, to)
        led_by: dict[str, list[int]] = {n: [] for n in self.nodes}
        for s, c in enumerate(self.copies):
            led_by[c[0]].append(s)
        for src in self.nodes:  # chains: src -> a -> ... -> a node under its quota
            while led[src] > quota[src]:
                path = self._chain(src, led, quota, led_by)
                if path is None:
                    break
                for s, frm, to in path:
                    hand(s, to)
                    led_by[frm].remove(s)
                    led_by[to].append(s)

    def _chain(self, src: str, led: dict[str, int], quota: dict[str, int],
               led_by: dict[str, list[int]]) -> list[tuple[int, str, str]] | None:
        """The shortest chain of handovers from `src` to a node under its primary quota."""
        back: dict[str, tuple[int, str] | None] = {src: None}
        queue = deque([src])
        while queue:
            n = queue.popleft()
            for s in led_by[n]:
                for m in self.copies[s][1:]:
                    if m in back:
                        continue
                    back[m] = (s, n)
                    if led[m] < quota[m]:
                        path = []
                        while back[m] is not None:
                            shard, frm = back[m]
                            path.append((shard, frm, m))
                            m = frm
                        return path[::-1]
                    queue.append(m)
        return None


def balance(current: Sequence[Sequence[str]], nodes: Sequence[str], replication: int,
            zones: Mapping[str, str] | None = None) -> Copies:
    """Each shard's copies, the primary first, balanced over `nodes` with the fewest changes to
    `current` (see the module's docstring). `zones` maps a node to its zone (missing: its own)."""
    plan = _Plan(current, nodes, replication, zones)
    plan.fill()
    plan.even_copies()
    plan.even_primaries()
    return tuple(tuple(c) for c in plan.copies)
