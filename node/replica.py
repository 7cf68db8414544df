"""One copy of one shard on this node: its state, its store, its log pins and its follower links.

A `Replica`'s state says what the copy may do; it changes only along these transitions, each
made by one caller (node.shard_set for roles and fences, node.moves for copies changing hands):

    RECEIVING -> PRIMARY | FOLLOWER   adopted (`Node.adopt`): the placement view says which
    RECEIVING -> RELEASED             aborted (`Node.abort_incoming`), or the copy failed
    PRIMARY  <-> FOLLOWER             a newer placement view (a failover, a move's flip)
    PRIMARY | FOLLOWER -> FENCED      a move's source stops taking writes (`Node.fence`)
    FENCED -> PRIMARY | FOLLOWER      the move rolled back (`Node.unfence`)
    any held state -> RELEASED        dropped (`Node.release`, or a re-seed replacing the copy)

RECEIVING: being copied here (a move's target, or a re-seed); nothing is served from it.
PRIMARY: served; takes writes, and pushes them to its followers (`links`, node.replication).
FOLLOWER: served for reads; takes changes only from its primary (`Node.apply_changes`).
FENCED: served for reads; writes are refused (NotOwnedError: retry) while its shard moves away.
RELEASED: gone; its store is closed and its folder deleted. Nothing leaves it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from node.errors import NodeError
from node.store import ShardStore


class ReplicaState(Enum):
    RECEIVING = "receiving"
    FOLLOWER = "follower"
    PRIMARY = "primary"
    FENCED = "fenced"
    RELEASED = "released"


ROLES = (ReplicaState.PRIMARY, ReplicaState.FOLLOWER)
HELD = (*ROLES, ReplicaState.FENCED)  # the states of a copy this node serves
ALLOWED = {
    ReplicaState.RECEIVING: {*ROLES, ReplicaState.RELEASED},
    ReplicaState.PRIMARY: {ReplicaState.FOLLOWER, ReplicaState.FENCED, ReplicaState.RELEASED},
    ReplicaState.FOLLOWER: {ReplicaState.PRIMARY, ReplicaState.FENCED, ReplicaState.RELEASED},
    ReplicaState.FENCED: {*ROLES, ReplicaState.RELEASED},
    ReplicaState.RELEASED: set(),
}


class Replica:
    def __init__(self, shard: int, state: ReplicaState, store: ShardStore | None = None) -> None:
        self.shard = shard
        self.state = state
        self.store = store  # opened on first use (node.shard_set), or installed by a copy (node.moves)
        self.links: dict[str, Any] = {}  # follower -> node.replication.Link, while this copy is the primary

    def to(self, state: ReplicaState) -> None:
        """Move to `state`; NodeError if the transition is not one of the allowed ones (a bug)."""
        if state != self.state and state not in ALLOWED[self.state]:
            raise NodeError(f"shard {self.shard}: a {self.state.value} copy cannot become {state.value}")
        self.state = state

    @property
    def held(self) -> bool:
        return self.state in HELD

    def pin_log(self, name: str, seq: int | None) -> None:
        """Keep this copy's changes after `seq` for reader `name` (None: release the pin); on the store thread."""
        if self.store is not None:
            self.store.pin_log(name, seq)

    def close_links(self) -> None:
        """Stop pushing to this copy's followers (on the event loop)."""
        for link in self.links.values():
            link.close()
        self.links.clear()

    def close(self) -> None:
        """RELEASED: close its store (on the store thread; its follower links are closed first, on
        the event loop: `close_links`)."""
        self.to(ReplicaState.RELEASED)
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def __repr__(self) -> str:
        return f"Replica({self.shard}, {self.state.value})"
