"""Operator routes: the cluster's shape and its changes (`tellodb cluster`), what it holds, shard
snapshots for `tellodb backup`, and the upstream engine's reset of all data.

`GET /admin/shards` describes the cluster (version, shard count, model, dimension, the node of each
shard). `POST /admin/shards/{shard}/snapshot` takes a consistent copy of one shard while it serves
and streams its bytes; the headers carry its sequence number and sha256, so the client can verify
what it wrote. The bytes come from the node through Ray, a chunk per call: nothing needs a
filesystem shared with the node's machine.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from router import __version__, tuning
from router.cluster import Cluster
from router.errors import ApiError, BadRequest, NotFound
from router.http import CLUSTER, audit, read_json
from router.schemas import RESET_PHRASES, NodeRequest, ResetRequest, SplitRequest, parse

log = logging.getLogger("tellodb.router")


async def cluster_status(request: web.Request) -> web.Response:
    """GET /admin/cluster: nodes, their shards and sizes, moves in progress, the placement epoch."""
    return web.json_response(await request.app[CLUSTER].cluster_status())


async def add_node(request: web.Request) -> web.Response:
    """POST /admin/nodes {"name"}: a joined node becomes a member; its share of shards moves to it."""
    req = parse(NodeRequest, await read_json(request))
    started = await request.app[CLUSTER].add_node(req.name)
    audit(request, "add_node", 202, node=req.name, epoch=started["epoch"])
    return web.json_response(started, status=202)


async def split(request: web.Request) -> web.Response:
    """POST /admin/shards/split {"shard"}: the shard (or the largest) splits in two while it serves."""
    req = parse(SplitRequest, await read_json(request))
    started = await request.app[CLUSTER].split(req.shard)
    audit(request, "split", 202, shard=started["splitting"], epoch=started["epoch"])
    return web.json_response(started, status=202)


async def remove_node(request: web.Request) -> web.Response:
    """DELETE /admin/nodes/{name}: every shard of the node moves to the others."""
    name = request.match_info["name"]
    started = await request.app[CLUSTER].remove_node(name)
    audit(request, "remove_node", 202, node=name, epoch=started["epoch"])
    return web.json_response(started, status=202)


async def rebalance(request: web.Request) -> web.Response:
    """POST /admin/rebalance: the pending moves and handovers start (the members stay as they are)."""
    started = await request.app[CLUSTER].rebalance()
    audit(request, "rebalance", 202, epoch=started["epoch"], pending_moves=started["pending_moves"])
    return web.json_response(started, status=202)


async def shards(request: web.Request) -> web.Response:
    cluster = request.app[CLUSTER]
    info = next(iter(cluster.node_info.values()), {})
    placement = cluster.placement
    return web.json_response({
        "engine_version": __version__,
        "shards": placement.shards,
        "created_shards": placement.created_shards,
        "ranges": [list(r) for r in placement.ranges],
        "model": cluster.config.embedding.model,
        "dimension": info.get("dimension"),
        "nodes": {str(s): placement.node_of_shard(s) for s in range(placement.shards)},
    })


async def snapshot(request: web.Request) -> web.StreamResponse:
    cluster = request.app[CLUSTER]
    raw = request.match_info["shard"]
    if not raw.isdigit() or int(raw) >= cluster.placement.shards:
        raise NotFound(f"no shard {raw!r} (shards are 0 to {cluster.placement.shards - 1})")
    started = time.monotonic()
    info = await cluster.snapshot(int(raw))
    node = info["node"]
    try:
        response = web.StreamResponse(headers={
            "Content-Type": "application/octet-stream", "Content-Length": str(info["bytes"]),
            "X-Tellodb-Shard": raw, "X-Tellodb-Seq": str(info["seq"]), "X-Tellodb-Sha256": info["sha256"]})
        await response.prepare(request)
        chunk = tuning.SNAPSHOT_CHUNK_BYTES
        for offset in range(0, info["bytes"], chunk):
            await response.write(await cluster.read_snapshot(node, info["id"], offset, chunk))
        await response.write_eof()
    finally:
        await cluster.drop_snapshot(node, info["id"])
    request.app.logger.info("snapshot shard=%s seq=%d bytes=%d seconds=%.2f", raw, info["seq"], info["bytes"],
                            time.monotonic() - started)
    audit(request, "snapshot", 200, shard=int(raw), seq=info["seq"])
    return response


async def reset(request: web.Request) -> web.Response:
    """POST /admin/reset {"confirm": "delete-all-data"}: erase every entity on every node."""
    req = parse(ResetRequest, await read_json(request))
    if req.confirm not in RESET_PHRASES:
        audit(request, "reset", 400)
        raise BadRequest(f'confirm: a reset erases every memory of every entity; send {{"confirm": '
                         f'"{RESET_PHRASES[0]}"}} to do it')
    erased = {"entities": 0, "memories": 0, "relations": 0, "measurements": 0}
    started = time.monotonic()
    try:
        await erase_everything(request.app[CLUSTER], erased)
    except ApiError as exc:
        audit(request, "reset", exc.status, **erased)
        raise
    audit(request, "reset", 200, **erased)
    log.info("reset: every entity erased entities=%d memories=%d seconds=%.1f", erased["entities"],
             erased["memories"], time.monotonic() - started)
    return web.json_response({"reset": True, **erased})


async def erase_everything(cluster: Cluster, erased: dict[str, int]) -> None:
    """Erase entity after entity through `Cluster.erase_entity` (every trace, on every node), adding
    to `erased` as it goes. The entities come from the oldest memories left (a time-ordered read of
    every node, as a temporal query without text does), a page at a time, until a page names none
    this reset has not erased: a follower may still show an erased entity until it catches up, and
    memories written meanwhile by other clients may stay or go."""
    done: set[str] = set()
    while True:
        page = await cluster.query(None, None, tuning.RESET_PAGE)
        found = sorted({hit["entity_id"] for hit in page} - done)
        if not found:
            return
        for entity in found:
            removed = await cluster.erase_entity(entity)
            done.add(entity)
            erased["entities"] += 1
            for counts in removed.values():
                for kind in ("memories", "relations", "measurements"):
                    erased[kind] += counts[kind]
