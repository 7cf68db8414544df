"""Placement: entity -> shard by a stable hash, shard -> node actor by consistent hashing.

The shard is the unit of placement. Shards map onto node names with `uhashring` (ketama-style,
virtual nodes), so adding or removing a node moves about 1/N of the shards and nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from uhashring import HashRing

from node.ids import shard_of

VNODES = 160


@dataclass(frozen=True)
class Placement:
    shards: int
    nodes: tuple[str, ...]
    epoch: int = 1
    owner: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a placement needs at least one node")
        ring = HashRing(nodes={n: {"vnodes": VNODES} for n in self.nodes}, hash_fn="ketama")
        object.__setattr__(self, "owner", tuple(ring.get_node(f"shard-{s}") for s in range(self.shards)))

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
