"""Placement: entity -> shard by a stable hash, shard -> node by an explicit owner table with an epoch.

Entity -> shard: shard s holds the entities whose hash h has h % m == r, for its range (m, r) in
`ranges`. A new cluster of N shards gives shard s the range (N, s), i.e. `h % N`, which is what
every earlier version did, so a data directory made before splits existed reads the same. A split
of s (m, r) gives s the range (2m, r) and a new shard, numbered next, (2m, r + m): half of its
entities, chosen by one more bit of the hash, as in linear hashing (node.splits does the data's
side). Free-form ids take their home shard by the same rule, hashing the id.

The shard is the unit of placement. Where a shard's copies belong is `node.control.balance.balance`
of the current copies and members: every node within one copy (and one primary) of the mean, reached
with the fewest moves, so a join takes about shards/N and nothing moves between the other nodes. A
new cluster is balanced from nothing (round-robin by load). After that the table changes one shard
at a time, as each move finishes (`with_owner`), and every change takes a new epoch: a copy of the
placement says how current it is, and an older one is replaced by a newer one, never the reverse.
(Earlier versions placed a new cluster's copies on a consistent-hash ring, 1 to 14 shards a node for
64 shards on 8: such a placement.json is read as it is, and evened out by the next rebalance.)
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property

from node.control.balance import balance
from node.ids import shard_of, stable_hash


@dataclass(frozen=True)
class Placement:
    shards: int
    nodes: tuple[str, ...]  # the members: nodes that own shards or are to receive some
    epoch: int = 1
    owner: tuple[str, ...] = field(default=())  # per shard, its primary copy; derived from `replicas`
    replication: int = 1  # copies per shard (node.replication)
    replicas: tuple[tuple[str, ...], ...] = field(default=())  # per shard, its copies, the primary first
    zones: tuple[tuple[str, str], ...] = field(default=())  # (node, zone) of the nodes that carry a zone label
    # (shard, follower) copies that may miss acknowledged writes: their primary wrote without them (they
    # were down) once the authority had recorded them here, so a failover never promotes one of them.
    behind: tuple[tuple[int, str], ...] = field(default=())
    # per shard, (modulus, residue): the entities whose hash % modulus == residue; () = (shards, s)
    ranges: tuple[tuple[int, int], ...] = field(default=())
    created_shards: int = 0  # the shard count the cluster was created with (cluster.yaml's); 0 = shards

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a placement needs at least one node")
        if not self.created_shards:
            object.__setattr__(self, "created_shards", self.shards)
        if not self.ranges:
            object.__setattr__(self, "ranges", tuple((self.shards, s) for s in range(self.shards)))
        if len(self.ranges) != self.shards:
            raise ValueError(f"a placement of {self.shards} shards names {len(self.ranges)} hash ranges")
        if not self.replicas:
            replicas = (tuple((o,) for o in self.owner) if self.owner
                        else balance([()] * self.shards, self.nodes, self.replication, dict(self.zones)))
            object.__setattr__(self, "replicas", replicas)
        if len(self.replicas) != self.shards:
            raise ValueError(f"a placement of {self.shards} shards names {len(self.replicas)} copy lists")
        object.__setattr__(self, "owner", tuple(r[0] for r in self.replicas))
        object.__setattr__(self, "behind", tuple(sorted({(int(s), n) for s, n in self.behind
                                                         if 0 <= int(s) < self.shards and n in self.replicas[s][1:]})))

    def shard_of(self, entity_id: str) -> int:
        if self.shards == self.created_shards:  # never split: every range is (shards, s)
            return shard_of(entity_id, self.shards)
        return self._shard_of_hash(stable_hash(entity_id))

    def _shard_of_hash(self, h: int) -> int:
        by_range = self._by_range
        for modulus in self._moduli:
            found = by_range.get((modulus, h % modulus))
            if found is not None:
                return found
        raise ValueError(f"the hash ranges of placement epoch {self.epoch} do not cover hash {h}")

    @cached_property
    def _by_range(self) -> dict[tuple[int, int], int]:
        return {rng: s for s, rng in enumerate(self.ranges)}

    @cached_property
    def _moduli(self) -> list[int]:
        return sorted({m for m, _ in self.ranges})

    def node_of_shard(self, shard: int) -> str:
        return self.owner[shard]

    def id_home(self, memory_id: str) -> int:
        """The home shard of a free-form memory id: the one that records where it lives (node.id_homes)."""
        return self.shard_of(memory_id)

    def family(self, shard: int) -> list[int]:
        """`shard` and the shards split from the same created shard (it first): where a memory
        recorded in `shard` may be now, once splits have moved half of its entities."""
        base = self.ranges[shard][1] % self.created_shards
        return [shard] + [s for s, (_, r) in enumerate(self.ranges) if r % self.created_shards == base and s != shard]

    def with_split(self, shard: int) -> Placement:
        """`shard` split in two at the next epoch: it keeps the entities whose next hash bit is 0, a new
        shard (numbered `shards`) takes the others. Both copies are on the primary only: the split is
        made there (node.splits), and followers are copied again from it (the rebalance adds them)."""
        modulus, residue = self.ranges[shard]
        primary = (self.owner[shard],)
        ranges = list(self.ranges)
        ranges[shard] = (2 * modulus, residue)
        replicas = list(self.replicas)
        replicas[shard] = primary
        return replace(self, shards=self.shards + 1, epoch=self.epoch + 1, owner=(),
                       replicas=(*replicas, primary), ranges=(*ranges, (2 * modulus, residue + modulus)),
                       behind=tuple(pair for pair in self.behind if pair[0] != shard))

    def node_of(self, entity_id: str) -> str:
        return self.owner[self.shard_of(entity_id)]

    def shards_of(self, node: str) -> list[int]:
        """Shards with a copy on `node` (primary or follower)."""
        return [s for s, r in enumerate(self.replicas) if node in r]

    def primaries_of(self, node: str) -> list[int]:
        return [s for s, n in enumerate(self.owner) if n == node]

    def followers(self, shard: int) -> tuple[str, ...]:
        return self.replicas[shard][1:]

    def by_node(self) -> dict[str, list[int]]:
        """Each node's primary shards (where requests for a shard go)."""
        table: dict[str, list[int]] = defaultdict(list)
        for s, n in enumerate(self.owner):
            table[n].append(s)
        return dict(table)

    def holders(self) -> set[str]:
        return {n for r in self.replicas for n in r}

    def _with_replicas(self, shard: int, copies: tuple[str, ...]) -> Placement:
        replicas = list(self.replicas)
        replicas[shard] = copies
        return self._same_plan(replace(self, replicas=tuple(replicas), owner=(), epoch=self.epoch + 1))

    def with_owner(self, shard: int, node: str) -> Placement:
        """This placement with `shard`'s single copy on `node`, at the next epoch."""
        return self._with_replicas(shard, (node,))

    def with_copy_moved(self, shard: int, source: str, target: str) -> Placement:
        """`shard`'s copy on `source` now on `target`, at the next epoch. A moved primary hands over
        to the first follower (up to date: writes are acknowledged by every live copy), or to the
        target when there is none."""
        copies = self.replicas[shard]
        if source not in copies:
            raise ValueError(f"shard {shard} has no copy on {source}")
        rest = tuple(n for n in copies if n != source)
        if copies[0] == source and not rest:
            return self._with_replicas(shard, (target,))
        if copies[0] == source:
            return self._with_replicas(shard, (*rest, target))
        return self._with_replicas(shard, tuple(target if n == source else n for n in copies))

    def with_primary(self, shard: int, node: str) -> Placement:
        """`node`, already a copy of `shard`, becomes its primary (failover); the old one goes last."""
        copies = self.replicas[shard]
        if node not in copies:
            raise ValueError(f"shard {shard} has no copy on {node}")
        return self._with_replicas(shard, (node, *(n for n in copies[1:] if n != node), copies[0]) if
                                   node != copies[0] else copies)

    def with_nodes(self, nodes: tuple[str, ...]) -> Placement:
        """The same copies with another member list, at the next epoch (shards move one by one after)."""
        return replace(self, nodes=tuple(nodes), owner=(), epoch=self.epoch + 1)

    def is_behind(self, shard: int, node: str) -> bool:
        return (shard, node) in self.behind

    def with_behind(self, add: set[tuple[int, str]] = frozenset(), drop: set[tuple[int, str]] = frozenset()
                    ) -> Placement:
        """These follower copies recorded as missing writes (`add`) or in sync again (`drop`), at the
        next epoch if that changes anything."""
        behind = (set(self.behind) | set(add)) - set(drop)
        changed = self._same_plan(replace(self, behind=tuple(behind), owner=(), epoch=self.epoch + 1))
        return self if changed.behind == self.behind else changed

    def with_zones(self, zones: dict[str, str]) -> Placement:
        """The nodes' zones (replicas of a shard go to distinct zones), at the next epoch if they changed."""
        pairs = tuple(sorted((n, z) for n, z in zones.items() if z))
        return self if pairs == self.zones else replace(self, zones=pairs, owner=(), epoch=self.epoch + 1)

    def target(self) -> tuple[tuple[str, ...], ...]:
        """Where each shard's copies belong, the primary first (balanced from where they are)."""
        return self._target

    def __getstate__(self) -> dict:  # pushed to nodes without the plan and look-up tables (rebuilt on use)
        return {k: v for k, v in self.__dict__.items() if k not in ("_target", "_by_range", "_moduli")}

    def _same_plan(self, changed: Placement) -> Placement:
        """`changed` (the same members, replication and zones: a copy moved, added or dropped, a
        primary handed over) keeps this placement's target once it is known: the rest of the same
        plan, still balanced, without asking `balance` again after every move (seconds at 16k
        shards on a few nodes)."""
        if "_target" in self.__dict__:
            changed.__dict__["_target"] = self.__dict__["_target"]
        return changed

    @cached_property
    def _target(self) -> tuple[tuple[str, ...], ...]:
        return balance(self.replicas, self.nodes, self.replication, dict(self.zones))

    def handovers(self) -> list[tuple[int, str, str]]:
        """(shard, from, to) for each shard whose copies are where they belong but whose primary
        should be another of them (no data moves: the primary role changes hands)."""
        return [(s, now[0], want[0]) for s, (now, want) in enumerate(zip(self.replicas, self.target()))
                if set(now) == set(want) and now[0] != want[0]]

    def moves(self) -> list[tuple[int, str | None, str | None]]:
        """(shard, from, to) for each copy not where it belongs yet; `from` None: a copy to add (the
        replication grew, a node left), `to` None: a copy to drop (it shrank)."""
        found: list[tuple[int, str | None, str | None]] = []
        for s, (now, want) in enumerate(zip(self.replicas, self.target())):
            leaving = [n for n in now if n not in want]
            coming = [n for n in want if n not in now]
            found += [(s, a, b) for a, b in zip(leaving, coming)]
            found += [(s, None, b) for b in coming[len(leaving):]]
            found += [(s, a, None) for a in leaving[len(coming):]]
        return found

    def with_copy_added(self, shard: int, node: str) -> Placement:
        return self._with_replicas(shard, (*self.replicas[shard], node))

    def with_copy_dropped(self, shard: int, node: str) -> Placement:
        """`shard` without its copy on `node` (a primary hands over to the first follower)."""
        rest = tuple(n for n in self.replicas[shard] if n != node)
        if not rest:
            raise ValueError(f"shard {shard}: its last copy cannot be dropped")
        return self._with_replicas(shard, rest)

    def to_json(self) -> dict:
        found = {"shards": self.shards, "nodes": list(self.nodes), "epoch": self.epoch, "owner": list(self.owner),
                 "replication": self.replication, "replicas": [list(r) for r in self.replicas]}
        if self.behind:
            found["behind"] = [list(pair) for pair in self.behind]
        if self.shards != self.created_shards:  # split: written only then, so an unsplit file reads as before
            found["ranges"] = [list(r) for r in self.ranges]
            found["created_shards"] = self.created_shards
        return {**found, "zones": dict(self.zones)} if self.zones else found

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        """A placement read from JSON; each node name is one string object (`sys.intern`), as in a
        placement built here, so pickling it for the nodes writes each name once, not per copy."""
        name = sys.intern
        return cls(int(data["shards"]), tuple(map(name, data["nodes"])), int(data["epoch"]),
                   tuple(map(name, data["owner"])), int(data.get("replication", 1)),
                   tuple(tuple(map(name, r)) for r in data.get("replicas", ())),
                   tuple(sorted(data.get("zones", {}).items())), tuple(tuple(p) for p in data.get("behind", ())),
                   tuple(tuple(r) for r in data.get("ranges", ())), int(data.get("created_shards", 0)))
