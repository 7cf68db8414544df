"""`tellodb cluster status | add-node NAME | remove-node NAME | rebalance | split [SHARD]`, against any
router's admin endpoints.

`add-node` and `remove-node` return as soon as the placement authority has the new member list;
the shards then move one at a time in the background. Without `--no-wait` the command follows
the moves with a progress line (shards and bytes moved) until none is left, and fails if one does.
`split` waits for the split (the shard's copy into two halves, then a short write fence), then
follows the moves that place the new shard, the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse

from router import tuning
from router.client import ClientError, Progress, get_json


def _get(url: str, key: str) -> dict:
    return get_json(f"{url}/admin/cluster", key)


def format_status(status: dict) -> str:
    """A short human-readable view of `GET /admin/cluster`."""
    under = status.get("under_replicated", [])
    lines = [f"epoch {status['epoch']}  shards {status['shards']}  replication {status.get('replication', 1)}  "
             f"pending moves {status['pending_moves']}  failovers {status.get('failovers', 0)}"
             + (f"  under-replicated shards {under}" if under else "")
             + (f"  ERROR: {status['error']}" if status.get("error") else "")]
    if "auto_rebalance" in status:  # how shards move (node.control.autobalance)
        limit, waiting = status.get("max_bytes_per_s", 0), status["pending_moves"]
        line = (f"auto-rebalance {'on' if status['auto_rebalance'] else 'off'}  moves "
                + (f"at most {limit / 1e6:g} MB/s" if limit else "unlimited"))
        if status.get("paced_s"):
            line += f"  paused {status['paced_s']:g} s to keep under it"
        if waiting and not (status["auto_rebalance"] or status["rebalancing"] or status.get("error")):
            line += f"  {waiting} moves wait for a command (`tellodb cluster rebalance` starts them)"
        lines.append(line)
    lines.append(f"{'NODE':<16} {'MEMBER':<7} {'UP':<4} {'PRIMARY':>7} {'COPIES':>6} {'MEMORIES':>9} {'MiB':>8}")
    for name, n in sorted(status["members"].items()):
        mib = n.get("bytes", 0) / 2**20
        lines.append(f"{name:<16} {'yes' if n['member'] else 'no':<7} {'yes' if n.get('up') else 'no':<4} "
                     f"{len(n['shards']):>7} {len(n.get('copies', n['shards'])):>6} {n.get('memories', 0):>9} "
                     f"{mib:>8.1f}")
    for d in status.get("shards_detail", []):
        if d["shard"] in under:
            copies = ", ".join(f"{c['node']}({c['role'][0]} seq={c['seq']} {c.get('state') or ('live' if c['live'] else 'DOWN')})"
                               for c in d["copies"])
            lines.append(f"shard {d['shard']}: lag {d['lag']}  {copies}")
    for m in status.get("moving", []):
        lines.append(f"moving shard {m['shard']}: {m['from']} -> {m['to']} ({m['state']})")
    return "\n".join(lines)


def follow(url: str, key: str, started: dict, stream=sys.stderr) -> dict:
    """Show the moves until none is pending; raise ClientError if the rebalance stopped on an error."""
    total = started["pending_moves"]
    base_shards, base_bytes = started["moved_shards"], started["moved_bytes"]
    bar = Progress("moving", total, stream)
    bar.update(0, 0)
    while True:
        status = _get(url, key)
        done = min(total, status["moved_shards"] - base_shards)
        bar.update(done, status["moved_bytes"] - base_bytes)
        if status["pending_moves"] == 0 and not status.get("pending_handovers") and not status["moving"]:
            if done < total:
                bar.update(total, status["moved_bytes"] - base_bytes)
            return status
        if status.get("error") and not status["rebalancing"]:
            raise ClientError(status["error"])
        time.sleep(tuning.CLUSTER_POLL_S)


def follow_split(url: str, key: str, started: dict, stream=sys.stderr) -> dict:
    """Wait until the split has added its shard; raise ClientError if it failed."""
    shown = None
    while True:
        status = _get(url, key)
        if status["shards"] > started["shards"]:
            return status
        if status.get("error") and not status["rebalancing"]:
            raise ClientError(status["error"])
        state = next((m["state"] for m in status["moving"] if m.get("split")), "starting")
        if state != shown:
            print(f"splitting shard {started['splitting']}: {state}", file=stream)
            shown = state
        time.sleep(tuning.CLUSTER_POLL_S)


def split(url: str, key: str, args: argparse.Namespace) -> int:
    started = get_json(f"{url}/admin/shards/split", key, "POST", {"shard": args.shard})
    print(f"splitting shard {started['splitting']} of {started['shards']}", file=sys.stderr)
    if args.no_wait:
        return 0
    status = follow_split(url, key, started)
    print(f"split: shard {started['splitting']} and new shard {status['shards'] - 1}, epoch {status['epoch']}",
          file=sys.stderr)
    if status["rebalancing"] and status["pending_moves"]:
        status = follow(url, key, status)
    print(f"done: epoch {status['epoch']}, {status['shards']} shards", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    url, key = args.url.rstrip("/"), args.key
    try:
        if not key:
            raise ClientError("an admin key is needed: --key KEY or TELLODB_API_KEY")
        if args.cluster_command == "status":
            status = _get(url, key)
            print(json.dumps(status, indent=2) if args.json else format_status(status))
            return 0
        if args.cluster_command == "split":
            return split(url, key, args)
        if args.cluster_command == "rebalance":
            started = get_json(f"{url}/admin/rebalance", key, "POST", {})
            print(f"rebalance at epoch {started['epoch']}; {started['pending_moves']} shard moves, "
                  f"{started.get('pending_handovers', 0)} primary handovers", file=sys.stderr)
            if args.no_wait or not (started["pending_moves"] or started.get("pending_handovers")):
                return 0
            print(f"done: epoch {follow(url, key, started)['epoch']}", file=sys.stderr)
            return 0
        name = urllib.parse.quote(args.name, safe="")
        if args.cluster_command == "add-node":
            started = get_json(f"{url}/admin/nodes", key, "POST", {"name": args.name})
        else:
            started = get_json(f"{url}/admin/nodes/{name}", key, "DELETE")
        verb = "added" if args.cluster_command == "add-node" else "removed"
        print(f"node {args.name!r} {verb} at epoch {started['epoch']}; {started['pending_moves']} shard moves",
              file=sys.stderr)
        if args.no_wait or started["pending_moves"] == 0:
            return 0
        status = follow(url, key, started)
        print(f"done: epoch {status['epoch']}", file=sys.stderr)
        return 0
    except ClientError as exc:
        print(f"tellodb cluster {args.cluster_command}: {exc}", file=sys.stderr)
        return 1


def add_parser(sub) -> None:
    c = sub.add_parser("cluster", help="see and change a running cluster (nodes, shards, moves)")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    s = csub.add_parser("status", help="nodes, their shards and sizes, moves in progress, the placement epoch")
    s.add_argument("--json", action="store_true", help="the whole status as JSON")
    a = csub.add_parser("add-node", help="give a joined node its share of shards (about 1/N of them move)")
    a.add_argument("name")
    r = csub.add_parser("remove-node", help="move every shard of a node to the others")
    r.add_argument("name")
    b = csub.add_parser("rebalance", help="carry out the pending moves and primary handovers (the members stay)")
    sp = csub.add_parser("split", help="split a shard in two while it serves (a new shard takes half of its "
                                       "entities); then the new shard is placed like any other")
    sp.add_argument("shard", type=int, nargs="?", help="the shard to split (default: the largest)")
    for p in (a, r, b, sp):
        p.add_argument("--no-wait", action="store_true", help="return once the moves are planned")
    for p in (s, a, r, b, sp):
        p.add_argument("--url", default="http://127.0.0.1:3000", help="any router (default: %(default)s)")
        p.add_argument("--key", default=os.environ.get("TELLODB_API_KEY"),
                       help="an admin key (default: $TELLODB_API_KEY)")
