"""When data moves without a command, and how fast moves may copy.

`AutoBalance` is a part of `node.control.authority.PlacementAuthority` (a mixin: it reads and sets
the authority's placement record, `joined`, `down_since`, `movable`, `recovering`, and starts the
move driver, node.control.rebalance):

- `auto_rebalance` (cluster.yaml; off by default: data moves when an operator chooses): a node that
  joins, or that answers again after it was taken out for silence (node.control.failover), and is
  not a member becomes one, as `add_node` makes it, and its share of shards moves to it. A node
  the operator removed (`remove_node`) stays out until `add_node` brings it back, even when its
  process starts again.
- Resuming after a restart of the head: pending moves are started again only with
  `auto_rebalance`, or when a rebalance was asked for (add or remove a node, a member lost past
  `rebuild_after_s`, a new `replication`) and had not finished. An older version's placement
  (the consistent-hash ring's, up to 14 shards a node where the balanced one has 8) has moves
  pending under the balanced placement; they wait for an operator's command rather than start on
  upgrade. Both facts, "asked for" and "removed by the operator", are kept in
  `<data_dir>/rebalance.json` next to placement.json.
- Pace (`rebalance.max_bytes_per_s`): after each move of B bytes that took t seconds the rebalance
  waits B / max_bytes_per_s - t (`pause_after`), so the copies average at most that rate; 0: no
  limit. Moves run one at a time, so this is the whole rate of a rebalance.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from node.control import placement_file

log = logging.getLogger("tellodb")
STATE_FILE = "rebalance.json"


def pause_after(nbytes: int, seconds: float, max_bytes_per_s: float) -> float:
    """Seconds to wait after a move that copied `nbytes` in `seconds`, so that the move and the wait
    together average at most `max_bytes_per_s` (0: no limit, no wait)."""
    if max_bytes_per_s <= 0 or nbytes <= 0:
        return 0.0
    return max(0.0, nbytes / max_bytes_per_s - seconds)


def load_state(data_dir: str | Path) -> dict[str, Any]:
    """{"wanted": bool, "removed": [names]} from `<data_dir>/rebalance.json`; a file that cannot be
    read counts as a rebalance asked for (going on with moves is the safe side: they are idempotent)."""
    path = Path(data_dir) / STATE_FILE
    try:
        found = json.loads(path.read_text())
        return {"wanted": bool(found.get("wanted")), "removed": sorted(map(str, found.get("removed", [])))}
    except FileNotFoundError:
        return {"wanted": False, "removed": []}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("%s not read (%s): a rebalance is taken as asked for", path, exc)
        return {"wanted": True, "removed": []}


def save_state(data_dir: str | Path, state: dict[str, Any]) -> None:
    placement_file.write_json(Path(data_dir) / STATE_FILE, state)


class AutoBalance:
    def _init_auto(self, auto_rebalance: bool, max_bytes_per_s: int) -> None:
        self.auto_rebalance = auto_rebalance
        self.max_bytes_per_s = max_bytes_per_s
        self.paced_s = 0.0  # seconds the rebalance waited to keep under max_bytes_per_s
        state = load_state(self.path.parent)
        self.rebalance_wanted: bool = state["wanted"]
        self.removed: set[str] = set(state["removed"])  # taken out by the operator: not made members by auto

    def _save_auto(self) -> None:
        try:
            save_state(self.path.parent, {"wanted": self.rebalance_wanted, "removed": sorted(self.removed)})
        except OSError as exc:
            log.warning("%s not saved: %s", self.path.parent / STATE_FILE, exc)

    def _want_rebalance(self, wanted: bool) -> None:
        if wanted != self.rebalance_wanted:
            self.rebalance_wanted = wanted
            self._save_auto()

    def _removed_by_operator(self, name: str, removed: bool) -> None:
        if (name in self.removed) != removed:
            (self.removed.add if removed else self.removed.discard)(name)
            self._save_auto()

    def _rebalance_ended(self, task: asyncio.Task) -> None:
        """The rebalance task ended: with nothing left to do, no restart of the head should go on with it."""
        p = self._placement
        if not task.cancelled() and not p.moves() and not p.handovers():
            self._want_rebalance(False)

    def _may_resume(self) -> bool:
        """Whether pending moves may start without a new command (a node joined, the head restarted)."""
        return self.auto_rebalance or self.rebalance_wanted

    def _auto_add(self) -> None:
        """With auto_rebalance: every joined, answering node that is not a member (and that the
        operator did not remove) becomes one, and the rebalance starts."""
        if not (self.auto_rebalance and self.movable) or self.recovering:
            return
        p = self._placement
        new = [n for n in sorted(self.joined) if n not in p.nodes and n not in self.down_since
               and n not in self.removed]
        if not new:
            return
        self._set(p.with_nodes((*p.nodes, *new)))
        log.info("Nodes added by auto_rebalance names=%s epoch=%d moves=%d", ",".join(new), self._placement.epoch,
                 len(self._placement.moves()))
        self._start_rebalance()

    async def _pace(self, move: dict[str, Any]) -> None:
        """After a move that copied data: wait so the copies average at most max_bytes_per_s."""
        pause = pause_after(move.get("bytes", 0), move.get("seconds", 0.0), self.max_bytes_per_s)
        if pause > 0:
            log.info("Rebalance paced shard=%s pause_s=%.2f max_bytes_per_s=%d", move.get("shard"), pause,
                     self.max_bytes_per_s)
            self.paced_s += pause
            await asyncio.sleep(pause)
