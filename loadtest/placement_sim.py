"""Placement at scale, without Ray: balance, moves per join and leave, and the authority's bookkeeping.

For each node count and replication 1 and 2, on the engine's own `node.control.placement.Placement`
and `node.control.balance.balance` (nothing here re-implements them):

- a new cluster's placement: copies and primaries per node (min, max, mean, max/mean);
- a join of one node: the moves `Placement.moves()` plans, then carried out one at a time as the move
  driver (node/control/rebalance.py) does: take the first move, apply it (`with_copy_moved`,
  `with_copy_added`, `with_copy_dropped`: one epoch each), ask for the moves again (one `balance`
  call per new placement), until none is left; then the primary handovers (`with_primary`), which
  the driver does not carry out yet: the primaries as the moves alone leave them are reported too;
- a leave of one node (the middle one): the same;
- the time of one `balance` call (the authority asks it again after every move);
- the authority's work: pings per second (every joined node every `Failover.PING_EVERY_S`), epochs
  per join and leave, placements pushed (each epoch to every joined node: `MoveDriver._push` after a
  move, `_ping` for the member change) and their bytes (pickled as a Ray call argument), the size of
  placement.json (written at every epoch);
- how long a join's moves take at the measured move throughput (`loadtest/results/move-2core.json`),
  for shards of `--memories-per-shard` memories;
- for reference, a ketama-style consistent-hash ring like the one the balance replaced (160 virtual
  nodes of 4 points each per node, md5; written here, not uhashring's exact points): owners per node
  and shards that change owner on a join, one copy.

When carrying a plan out with a `balance` call after every move would take longer than
`--replan-budget` seconds (a few nodes holding thousands of shards each: thousands of moves, and a
`balance` call of seconds), the plan is carried out one move at a time as planned, and `balance` is
asked at three checkpoints whether the rest of the plan is still what it says ("replayed" in the
results); whatever is left at the end is carried out as the driver would. The node counts of
`--always-driver` (default 1000) are carried out as the driver does whatever the budget. Handovers
asked for again after each one can come back to a placement already seen (a cycle: `balance` is
deterministic, so that would never end); the run says so, and carries the first handover plan out
whole instead.

    python loadtest/placement_sim.py                       # 4 .. 1000 nodes, 16,384 shards, R 1 and 2
    python loadtest/placement_sim.py --nodes 8,64 --shards 4096 --out /tmp/sim
    python loadtest/placement_sim.py --help

Writes results.json, results.md and balance-and-moves.png to `--out`
(default loadtest/results/placement-sim/).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import pickle
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.control.failover import Failover  # noqa: E402
from node.control.placement import Placement  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NODES = (4, 8, 16, 32, 64, 128, 256, 512, 1000)
SHARDS = 16384
MOVE_RUN = RESULTS / "move-2core.json"  # the measured move throughput (docs/benchmarks.md, Shard moves)
PROFILE_RUN = RESULTS / "memory-profile-2core.json"  # disk per memory at 1M (docs/ops/sizing.md)
RING_VNODES = 160  # the old ring's virtual nodes per node (uhashring, ketama: 4 points each)


def names(n: int) -> tuple[str, ...]:
    return tuple(f"node-{i}" for i in range(n))


def spread(p: Placement) -> dict:
    """Copies and primaries per member: min, max, mean, max/mean, and whether all are within one of the mean."""
    found = {}
    for what, counts in (("copies", Counter(n for r in p.replicas for n in r)), ("primaries", Counter(p.owner))):
        values = [counts.get(n, 0) for n in p.nodes]
        mean = sum(values) / len(values)
        found[what] = {"min": min(values), "max": max(values), "mean": round(mean, 3),
                       "max_over_mean": round(max(values) / mean, 4),
                       "within_one": all(abs(v - mean) < 1 for v in values)}
    return found


def apply_move(p: Placement, move: tuple[int, str | None, str | None]) -> Placement:
    """One move as the driver applies it (MoveDriver._move): one new placement, one epoch."""
    shard, source, target = move
    if source is None:
        return p.with_copy_added(shard, target)
    if target is None:
        return p.with_copy_dropped(shard, source)
    return p.with_copy_moved(shard, source, target)


def timed(p: Placement, what: str) -> tuple[list, float]:
    """`p.moves()` or `p.handovers()` on a placement not asked before: one `balance` call, timed."""
    started = time.perf_counter()
    found = getattr(p, what)()
    return found, time.perf_counter() - started


def carry_out(p: Placement, what: str, step, budget_s: float, per_call_s: float = 0.0,
              mode: str | None = None) -> tuple[Placement, dict]:
    """Carry out `p`'s moves (or handovers) one at a time until none is left, and check that the plan
    held: after each change the rest is one shorter (see the module's docstring for "replayed").
    Asking again after each change stops when it comes back to a placement it has been at (`cycle`:
    `balance` is deterministic, so it would go round for ever). `per_call_s`: a `balance` call's time
    when `p`'s plan was already asked (cached); `mode`: "driver" or "replayed" whatever the budget."""
    plan, first_s = timed(p, what)
    calls = [first_s]
    done = 0
    held = True
    if mode is None:
        mode = "driver" if len(plan) * max(first_s, per_call_s) <= budget_s else "replayed"
    rest = plan
    if mode == "replayed":
        checkpoints = {1, len(plan) // 2, len(plan)}
        for i, item in enumerate(plan, 1):
            p = step(p, item)
            done += 1
            if i in checkpoints:
                rest, seconds = timed(p, what)
                calls.append(seconds)
                held &= len(rest) == len(plan) - i
    seen = {p.replicas}
    cycle = None
    while rest:  # as the driver: the first of what is left, asked again after each change
        p = step(p, rest[0])
        done += 1
        if p.replicas in seen:
            cycle = done
            break
        seen.add(p.replicas)
        rest, seconds = timed(p, what)
        calls.append(seconds)
        held &= len(rest) == len(plan) - done
    return p, {"planned": len(plan), "carried_out": done, "plan_held": held and done == len(plan) and not cycle,
               "mode": mode, "cycle_after": cycle,
               "balance_calls": len(calls), "balance_s_first": round(first_s, 4),
               "balance_s_median": round(statistics.median(calls), 4), "balance_s_max": round(max(calls), 4)}


def hand_over(p: Placement, item: tuple[int, str, str]) -> Placement:
    return p.with_primary(item[0], item[2])


def sizes(p: Placement) -> dict:
    """What one push carries (a Ray call's argument: pickled, without the cached plan), the same after
    the authority read it back from placement.json (each node name then a string of its own, which
    pickle cannot share), the time to pickle it once, and placement.json."""
    started = time.perf_counter()
    pickled = len(pickle.dumps(p, protocol=5))
    seconds = time.perf_counter() - started
    reloaded = Placement.from_json(json.loads(json.dumps(p.to_json())))
    return {"pickle_bytes": pickled, "pickle_bytes_reloaded": len(pickle.dumps(reloaded, protocol=5)),
            "pickle_ms": round(seconds * 1000, 2), "json_bytes": len(json.dumps(p.to_json()))}


def change(before: Placement, after_members: tuple[str, ...], receivers: int, budget_s: float,
           driver: bool = False) -> dict:
    """A member change (join or leave) carried out to the end, with what the authority did for it.
    `receivers`: the joined nodes each new placement is pushed to."""
    started = time.perf_counter()
    p0 = before.with_nodes(after_members)
    p1, moves = carry_out(p0, "moves", apply_move, budget_s, mode="driver" if driver else None)
    moved_only = spread(p1)  # what the driver leaves today: it carries out moves, not handovers
    p2, handovers = carry_out(p1, "handovers", hand_over, budget_s, moves["balance_s_median"])
    if handovers["cycle_after"]:  # asked again after each, the handovers went round: the first plan whole
        p2, handovers["then_replayed"] = carry_out(p1, "handovers", hand_over, budget_s, mode="replayed")
    epochs = p2.epoch - before.epoch  # the member change, each move, each handover
    size = sizes(p2)
    newcomers = [n for n in after_members if n not in before.nodes]
    primaries = Counter(p1.owner)
    return {"moves": moves, "handovers": handovers, "handovers_done": p2.epoch - p1.epoch, "after_moves": moved_only,
            "new_node_primaries_after_moves": primaries.get(newcomers[0], 0) if newcomers else None,
            "after": spread(p2), "done": not p2.moves() and not p2.handovers(),
            "epochs": epochs, "epochs_driver_today": p1.epoch - before.epoch, "receivers": receivers,
            "placements_pushed": epochs * receivers, "bytes_pushed": epochs * receivers * size["pickle_bytes"],
            "bytes_pushed_reloaded": epochs * receivers * size["pickle_bytes_reloaded"],
            "placement_json_written": epochs * size["json_bytes"], **size,
            "seconds": round(time.perf_counter() - started, 2), "_placement": p2}


def simulate(shards: int, n: int, replication: int, budget_s: float = 15.0, driver: bool = False) -> dict:
    """A new placement of `shards` on `n` nodes, a join of one node and a leave of one (module docstring);
    `driver`: their moves carried out as the driver does whatever the budget."""
    members = names(n)
    started = time.perf_counter()
    new = Placement(shards, members, replication=replication)
    build_s = time.perf_counter() - started
    _, plan_s = timed(new, "moves")  # one balance call on a settled placement (nothing to move)
    joined = change(new, (*members, f"node-{n}"), n + 1, budget_s, driver)  # the new node has joined before add-node
    gone = members[n // 2]
    left = change(new, tuple(m for m in members if m != gone), n, budget_s, driver)  # it drains: still joined
    copies = shards * min(replication, n + 1)
    for c in (joined, left):
        c.pop("_placement")
    return {"nodes": n, "shards": shards, "replication": replication, "build_s": round(build_s, 3),
            "balance_s_settled": round(plan_s, 4), "new": spread(new), **sizes(new),
            "join": joined, "ideal_join_moves": round(copies / (n + 1), 2),
            "leave": left, "ideal_leave_moves": round(shards * min(replication, n) / n, 2),
            "pings_per_s": round((n + 1) / Failover.PING_EVERY_S, 1)}


# ---- the old ring, for reference ---------------------------------------------------------------

def _point(key: str) -> int:
    d = hashlib.md5(key.encode()).digest()
    return int.from_bytes(d[:4], "little")


def ring_owners(shards: int, nodes: tuple[str, ...], vnodes: int = RING_VNODES) -> list[str]:
    """Each shard's node on a ketama-style ring: per node `vnodes` md5 digests of 4 points each."""
    points = []
    for node in nodes:
        for v in range(vnodes):
            d = hashlib.md5(f"{node}-{v}".encode()).digest()
            points += [(int.from_bytes(d[i:i + 4], "little"), node) for i in range(0, 16, 4)]
    points.sort()
    keys = [k for k, _ in points]
    return [points[bisect.bisect(keys, _point(f"shard-{s}")) % len(points)][1] for s in range(shards)]


def ring(shards: int, n: int) -> dict:
    before = ring_owners(shards, names(n))
    after = ring_owners(shards, names(n + 1))
    counts = Counter(before)
    values = [counts.get(m, 0) for m in names(n)]
    return {"nodes": n, "min": min(values), "max": max(values), "mean": round(shards / n, 3),
            "max_over_mean": round(max(values) / (shards / n), 4),
            "join_moves": sum(a != b for a, b in zip(before, after)), "ideal_join_moves": round(shards / (n + 1), 2)}


# ---- what a move costs, from the measured runs ---------------------------------------------------

def move_cost(memories_per_shard: int) -> dict:
    """Seconds per shard move at the throughput measured in move-2core, and the shard's size."""
    run = json.loads(MOVE_RUN.read_text())["summary"]
    profile = json.loads(PROFILE_RUN.read_text())["marks"][-1]
    rate = run["memories_per_second"]
    moved_per_memory = run["mb_moved"] * 1e6 / run["memories_moved"]
    disk_per_memory = profile["disk_mib"] * 2**20 / profile["memories"]
    return {"source": f"loadtest/results/{MOVE_RUN.name} (summary) and {PROFILE_RUN.name} (disk at 1M)",
            "memories_per_second": rate, "mb_per_second": run["mb_per_second"],
            "moved_bytes_per_memory": round(moved_per_memory), "disk_bytes_per_memory": round(disk_per_memory),
            "memories_per_shard": memories_per_shard,
            "shard_disk_mib": round(memories_per_shard * disk_per_memory / 2**20, 1),
            "shard_moved_mb": round(memories_per_shard * moved_per_memory / 1e6, 1),
            "seconds_per_move": round(memories_per_shard / rate, 2),
            "formula": "seconds = data-carrying moves x memories_per_shard / memories_per_second (one move at a "
                       "time in the whole cluster, as the driver does); handovers carry no data"}


# ---- the run and its reports ---------------------------------------------------------------------

def run(node_counts: list[int], shards: int, replications: list[int], budget_s: float, memories_per_shard: int,
        ring_counts: list[int], always_driver: set[int] = frozenset()) -> dict:
    rows = []
    for replication in replications:
        for n in node_counts:
            row = simulate(shards, n, replication, budget_s, n in always_driver)
            rows.append(row)
            j = row["join"]
            print(f"R={replication} nodes={n}: copies {row['new']['copies']['min']}-{row['new']['copies']['max']}, "
                  f"join {j['moves']['carried_out']}/{j['moves']['planned']} moves ({j['moves']['mode']}) + "
                  f"{handed(j)} handovers, balance {j['moves']['balance_s_median']} s/call, "
                  f"{j['seconds'] + row['leave']['seconds']:.1f} s", file=sys.stderr, flush=True)
    cost = move_cost(memories_per_shard)
    for row in rows:
        for what in ("join", "leave"):
            c = row[what]
            carrying = c["moves"]["carried_out"]  # joins and leaves only move or add copies: each carries a shard
            c["rebalance_hours"] = round(carrying * cost["seconds_per_move"] / 3600, 2)
    rings = [ring(shards, n) for n in ring_counts]
    return {"shards": shards, "replications": replications, "ping_every_s": Failover.PING_EVERY_S,
            "replan_budget_s": budget_s, "always_driver": sorted(always_driver),
            "move_cost": cost, "rows": rows, "ring": rings, "ring_issue_case": ring(64, 8)}


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.2f}".rstrip("0").rstrip(".")


def size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def handed(c: dict) -> str:
    h = c["handovers"]
    if not h["cycle_after"]:
        return f"{c['handovers_done']:,}"
    return f"{c['handovers_done']:,} (asked after each: a cycle after {h['cycle_after']:,}; the first plan whole)"


def markdown(res: dict) -> str:
    cost = res["move_cost"]
    lines = [f"# Placement simulation: {res['shards']:,} shards, balance, moves, the authority's work", "",
             "`python loadtest/placement_sim.py` (pure Python, no Ray: the engine's own `Placement` and "
             "`balance`). Join: one node added; leave: the middle node removed. Moves are carried out one at a "
             "time as the move driver does (`driver`: a `balance` call after each; `replayed`: the first plan "
             "carried out, checked by `balance` at three points), then the primary handovers.", "",
             "## Balance of a new placement and a join", "",
             "| R | nodes | copies/node min-max (mean) | max/mean | primaries min-max | join moves planned / carried out "
             "(ideal S·R/(N+1)) | mode | handovers | new node's primaries after moves only | leave moves | "
             "balance s/call (median, max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        j, le, c, pr = r["join"], r["leave"], r["new"]["copies"], r["new"]["primaries"]
        lines.append(f"| {r['replication']} | {r['nodes']:,} | {c['min']:,}-{c['max']:,} ({_fmt(c['mean'])}) | "
                     f"{c['max_over_mean']} | {pr['min']:,}-{pr['max']:,} | {j['moves']['planned']:,} / "
                     f"{j['moves']['carried_out']:,} ({_fmt(r['ideal_join_moves'])}) | {j['moves']['mode']} | "
                     f"{handed(j)} | {j['new_node_primaries_after_moves']:,} | "
                     f"{le['moves']['carried_out']:,} ({_fmt(r['ideal_leave_moves'])}) | "
                     f"{j['moves']['balance_s_median']}, {j['moves']['balance_s_max']} |")
    lines += ["", "Every row: after the join and after the leave, every node within one copy and one primary "
              "of the mean: " + ("yes" if all(r[w]["after"][k]["within_one"] and r[w]["done"]
                                              for r in res["rows"] for w in ("join", "leave")
                                              for k in ("copies", "primaries")) else "**no** (see results.json)") +
              "; each plan held as carried out: " +
              ("yes" if all(r[w]["moves"]["plan_held"] for r in res["rows"] for w in ("join", "leave"))
               else "**no** (see results.json)") + ".", "",
              "## The authority's work per join", "",
              f"Pings: every joined node every {res['ping_every_s']} s. Epochs: the member change, each move, each "
              "handover. Pushes: each epoch to every joined node (the new one included); bytes: the placement "
              "pickled as a Ray argument (protocol 5), as built here and, in brackets, after the authority read "
              "it back from placement.json (a restarted head: every name a string of its own). Epochs per join "
              "count the moves only; each handover adds one more (the handovers column above).", "",
              "| R | nodes | pings/s | epochs per join (moves only) | placements pushed | "
              "bytes pushed | pickled placement | pickling per epoch (once per node) | placement.json | "
              "placement.json written per join |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        j = r["join"]
        lines.append(f"| {r['replication']} | {r['nodes']:,} | {_fmt(r['pings_per_s'])} | {j['epochs']:,} "
                     f"({j['epochs_driver_today']:,}) | {j['placements_pushed']:,} | "
                     f"{size(j['bytes_pushed'])} ({size(j['bytes_pushed_reloaded'])}) | {size(j['pickle_bytes'])} "
                     f"({size(j['pickle_bytes_reloaded'])}) | {j['pickle_ms'] * j['receivers'] / 1000:,.2f} s | "
                     f"{size(j['json_bytes'])} | "
                     f"{size(j['placement_json_written'])} |")
    lines += ["", "## How long a join's moves take", "",
              f"Measured move throughput: {cost['memories_per_second']} memories/s per move "
              f"({cost['mb_per_second']} MB/s, {cost['moved_bytes_per_memory']:,} bytes moved per memory: the SQLite "
              f"snapshot; the vector index is rebuilt on arrival), from {cost['source']}; "
              f"{cost['disk_bytes_per_memory']:,} bytes on disk per memory. A shard of "
              f"{cost['memories_per_shard']:,} memories: {cost['shard_disk_mib']:,} MiB on disk, "
              f"{cost['seconds_per_move']} s per move. {cost['formula'][0].upper() + cost['formula'][1:]}.", "",
              "| R | nodes | join moves | join hours | leave moves | leave hours |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['replication']} | {r['nodes']:,} | {r['join']['moves']['carried_out']:,} | "
                     f"{r['join']['rebalance_hours']:,} | {r['leave']['moves']['carried_out']:,} | "
                     f"{r['leave']['rebalance_hours']:,} |")
    doubling = res["shards"] * max(res["replications"]) / 2
    lines += ["", f"Doubling a cluster one join at a time (N to 2N) moves half of all copies, S·R/2: {doubling:,.0f} "
              f"moves at R={max(res['replications'])}, {doubling * cost['seconds_per_move'] / 86400:,.1f} days at "
              "this shard size, whatever N.",
              "", "## For reference: a consistent-hash ring (one copy)", "",
              f"A ketama-style ring written here ({RING_VNODES} virtual nodes of 4 points per node, md5), the shape "
              "of the ring the balance replaced; not uhashring's exact points (the issue's figure for that one: "
              "64 shards on 8 nodes, 1 to 14 per node).", "",
              "| shards | nodes | owners/node min-max (mean) | max/mean | join moves (ideal) |", "|---|---|---|---|---|"]
    for g, shards in [*((g, res["shards"]) for g in res["ring"]), (res["ring_issue_case"], 64)]:
        lines.append(f"| {shards:,} | {g['nodes']:,} | {g['min']:,}-{g['max']:,} "
                     f"({_fmt(g['mean'])}) | {g['max_over_mean']} | {g['join_moves']:,} ({_fmt(g['ideal_join_moves'])}) |")
    return "\n".join(lines) + "\n\n![balance and moves](balance-and-moves.png)\n"


def plot(res: dict, path: Path) -> bool:
    """The PNG of balance and moves; False (nothing written) without matplotlib (the `loadtest` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.5))
    for replication, colour in ((1, "tab:blue"), (2, "tab:orange")):
        rows = [r for r in res["rows"] if r["replication"] == replication]
        xs = [r["nodes"] for r in rows]
        a.plot(xs, [r["new"]["copies"]["max_over_mean"] for r in rows], "o-", color=colour,
               label=f"balance, R={replication}")
        b.plot(xs, [r["join"]["moves"]["carried_out"] for r in rows], "o-", color=colour,
               label=f"moves carried out, R={replication}")
        b.plot(xs, [r["ideal_join_moves"] for r in rows], "--", color=colour, label=f"ideal S·R/(N+1), R={replication}")
        c.plot(xs, [r["join"]["moves"]["balance_s_median"] for r in rows], "o-", color=colour,
               label=f"one balance call, R={replication}")
    rings = res["ring"]
    if rings:
        a.plot([g["nodes"] for g in rings], [g["max_over_mean"] for g in rings], "s:", color="grey",
               label="hash ring, R=1 (reference)")
        b.plot([g["nodes"] for g in rings], [g["join_moves"] for g in rings], "s:", color="grey",
               label="hash ring, R=1 (reference)")
    a.set(xscale="log", xlabel="nodes", ylabel="max / mean copies per node", title="balance of a new placement")
    b.set(xscale="log", yscale="log", xlabel="nodes before the join", ylabel="copies moved",
          title="moves per join of one node")
    c.set(xscale="log", yscale="log", xlabel="nodes", ylabel="seconds", title="one balance call during a join")
    for ax in (a, b, c):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{res['shards']:,} shards")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default=",".join(map(str, NODES)), help="node counts, comma-separated")
    parser.add_argument("--shards", type=int, default=SHARDS)
    parser.add_argument("--replication", default="1,2", help="copies per shard, comma-separated")
    parser.add_argument("--memories-per-shard", type=int, default=61035,
                        help="memories in a shard, for the time a join's moves take (default: 1B over 16,384 shards)")
    parser.add_argument("--replan-budget", type=float, default=15.0,
                        help="seconds of balance calls allowed per plan carried out as the driver does; "
                             "over it, the plan is replayed with three checks")
    parser.add_argument("--always-driver", default="1000",
                        help="node counts whose join and leave moves are carried out as the driver does whatever "
                             "the budget (comma-separated)")
    parser.add_argument("--ring-nodes", default="8,64,1000", help="node counts for the hash ring reference ('' none)")
    parser.add_argument("--out", type=Path, default=RESULTS / "placement-sim")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    res = run([int(x) for x in args.nodes.split(",")], args.shards, [int(x) for x in args.replication.split(",")],
              args.replan_budget, args.memories_per_shard, [int(x) for x in args.ring_nodes.split(",") if x],
              {int(x) for x in args.always_driver.split(",") if x})
    res["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(res) + f"\nThe whole run: {res['seconds']} s.\n")
    plotted = plot(res, args.out / "balance-and-moves.png")
    print(f"wrote {args.out}/results.json, results.md"
          + (", balance-and-moves.png" if plotted else " (no plot: `make loadtest-install` brings matplotlib)")
          + f" in {res['seconds']} s", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
