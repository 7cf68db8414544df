"""Placement: entity -> shard by a stable hash, shard -> node by an explicit owner table with an epoch.

The shard is the unit of placement. A new cluster's owners come from a consistent-hash ring over
the node names (`uhashring`, ketama-style, virtual nodes), so adding or removing a node moves about
1/N of the shards and nothing else (`ring_owners`). After that the table changes one shard at a
time, as each move finishes (`with_owner`), and every change takes a new epoch: a copy of the
placement says how current it is, and an older one is replaced by a newer one, never the reverse.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from uhashring import HashRing

from node.ids import shard_of

VNODES = 160


def ring_owners(shards: int, nodes: tuple[str, ...]) -> tuple[str, ...]:
    """Each shard's node on the consistent-hash ring of `nodes`."""
    return tuple(r[0] for r in ring_replicas(shards, nodes, 1))


def ring_replicas(shards: int, nodes: tuple[str, ...], n: int) -> tuple[tuple[str, ...], ...]:
    """Each shard's `n` copies (fewer if there are fewer nodes): the distinct nodes met walking the
    ring from the shard's point, the first being where a single copy would go."""
    if not nodes:
        raise ValueError("a placement needs at least one node")
    ring = HashRing(nodes={node: {"vnodes": VNODES} for node in nodes}, hash_fn="ketama")
    return tuple(tuple(found["nodename"] for found in ring.range(f"shard-{s}", min(n, len(nodes)), True))
                 for s in range(shards))


@dataclass(frozen=True)
class Placement:
    shards: int
    nodes: tuple[str, ...]  # the members: nodes that own shards or are to receive some
    epoch: int = 1
    owner: tuple[str, ...] = field(default=())  # per shard, its primary copy; derived from `replicas`
    replication: int = 1  # copies per shard (node.replication)
    replicas: tuple[tuple[str, ...], ...] = field(default=())  # per shard, its copies, the primary first

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a placement needs at least one node")
        if not self.replicas:
            replicas = (tuple((o,) for o in self.owner) if self.owner
                        else ring_replicas(self.shards, self.nodes, self.replication))
            object.__setattr__(self, "replicas", replicas)
        if len(self.replicas) != self.shards:
            raise ValueError(f"a placement of {self.shards} shards names {len(self.replicas)} copy lists")
        object.__setattr__(self, "owner", tuple(r[0] for r in self.replicas))

    def shard_of(self, entity_id: str) -> int:
        return shard_of(entity_id, self.shards)

    def node_of_shard(self, shard: int) -> str:
        return self.owner[shard]

    def id_home(self, memory_id: str) -> int:
        """The home shard of a free-form memory id: the one that records where it lives (node.id_homes)."""
        return shard_of(memory_id, self.shards)

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
        return replace(self, replicas=tuple(replicas), owner=(), epoch=self.epoch + 1)

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

    def target(self) -> tuple[tuple[str, ...], ...]:
        """Where each shard's copies belong on the ring of the current members."""
        return ring_replicas(self.shards, self.nodes, self.replication)

    def moves(self) -> list[tuple[int, str | None, str | None]]:
        """(shard, from, to) for each copy not on one of its ring nodes yet; `from` None: a copy to
        add (the replication grew), `to` None: a copy to drop (it shrank)."""
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
        return {"shards": self.shards, "nodes": list(self.nodes), "epoch": self.epoch, "owner": list(self.owner),
                "replication": self.replication, "replicas": [list(r) for r in self.replicas]}

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        return cls(int(data["shards"]), tuple(data["nodes"]), int(data["epoch"]), tuple(data["owner"]),
                   int(data.get("replication", 1)), tuple(tuple(r) for r in data.get("replicas", ())))
