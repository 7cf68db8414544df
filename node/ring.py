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
    if not nodes:
        raise ValueError("a placement needs at least one node")
    ring = HashRing(nodes={n: {"vnodes": VNODES} for n in nodes}, hash_fn="ketama")
    return tuple(ring.get_node(f"shard-{s}") for s in range(shards))


@dataclass(frozen=True)
class Placement:
    shards: int
    nodes: tuple[str, ...]  # the members: nodes that own shards or are to receive some
    epoch: int = 1
    owner: tuple[str, ...] = field(default=())  # per shard; empty: the ring's choice over `nodes`

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a placement needs at least one node")
        if not self.owner:
            object.__setattr__(self, "owner", ring_owners(self.shards, self.nodes))
        if len(self.owner) != self.shards:
            raise ValueError(f"a placement of {self.shards} shards names {len(self.owner)} owners")

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
        return [s for s, n in enumerate(self.owner) if n == node]

    def by_node(self) -> dict[str, list[int]]:
        table: dict[str, list[int]] = defaultdict(list)
        for s, n in enumerate(self.owner):
            table[n].append(s)
        return dict(table)

    def with_owner(self, shard: int, node: str) -> Placement:
        """This placement with `shard` owned by `node`, at the next epoch."""
        owner = list(self.owner)
        owner[shard] = node
        return replace(self, owner=tuple(owner), epoch=self.epoch + 1)

    def with_nodes(self, nodes: tuple[str, ...]) -> Placement:
        """The same owners with another member list, at the next epoch (shards move one by one after)."""
        return replace(self, nodes=tuple(nodes), epoch=self.epoch + 1)

    def target(self) -> tuple[str, ...]:
        """Where each shard belongs on the ring of the current members."""
        return ring_owners(self.shards, self.nodes)

    def moves(self) -> list[tuple[int, str, str]]:
        """(shard, from, to) for each shard not on its ring node yet."""
        return [(s, a, b) for s, (a, b) in enumerate(zip(self.owner, self.target())) if a != b]

    def to_json(self) -> dict:
        return {"shards": self.shards, "nodes": list(self.nodes), "epoch": self.epoch, "owner": list(self.owner)}

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        return cls(int(data["shards"]), tuple(data["nodes"]), int(data["epoch"]), tuple(data["owner"]))
