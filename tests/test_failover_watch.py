"""The router's watch of the authority's failovers (router.routing: `Routing._watched`): one shared
watch per router while attempts wait, never a task per request. That it drops an attempt stuck on a
failed-over node is tested under load with a paused node (tests/test_replicas.py)."""

from __future__ import annotations

import asyncio


async def test_waiting_requests_share_one_watch(cluster):
    """Forty requests waiting on their nodes at once: the router adds one task (its watch), not one
    per request, and each request still gets its own answer."""
    assert cluster.control.authority is not None  # the watch is on: there is an authority to ask
    release = asyncio.Event()
    started = 0

    async def work(node):
        nonlocal started
        started += 1
        await release.wait()
        return node.name

    before = len(asyncio.all_tasks())
    callers = [asyncio.ensure_future(cluster.routing.execute(s % cluster.config.shards, work)) for s in range(40)]
    while started < len(callers):
        await asyncio.sleep(0.01)
    added = len(asyncio.all_tasks()) - before - len(callers)
    release.set()
    answers = await asyncio.gather(*callers)
    assert added <= 1, f"{added} tasks besides the requests' own"
    assert answers == [cluster.placement.node_of_shard(s % cluster.config.shards) for s in range(40)]


def test_a_write_stuck_on_a_paused_node_goes_to_the_new_primary(make_server, tmp_path):
    """`replication: 2` over two node actors: SIGSTOP the primary of an entity's shard, then write
    for the entity. The write waits on the stopped node until the authority fails it over
    (failover_after_s: 2); the router's watch then drops the attempt and it is sent to the new
    primary, so it is acknowledged while the old one is still stopped. (Without the watch it would
    wait for the request's timeout, then answer 503.)"""
    import os
    import signal
    import uuid

    from conftest import http_json
    from node.ids import shard_of

    config = tmp_path / "cluster.yaml"
    config.write_text("nodes: 2\nreplication: 2\nfailover_after_s: 2\n")
    server = make_server(TELLODB_CONFIG=str(config)).start()
    base = server.base_url
    code, status = http_json(base, "/admin/cluster")
    assert code == 200, status
    entity = next(e for e in (f"paused-{uuid.uuid4().hex[:8]}" for _ in range(1000))
                  if status["owner"][shard_of(e, status["shards"])] == "node-1")
    code, body = http_json(base, "/ingest", {"entity_id": entity, "textual_content": "before the pause"})
    assert code == 201, body
    _, stats = http_json(base, "/stats")
    pid = stats["nodes"]["node-1"]["pid"]

    os.kill(pid, signal.SIGSTOP)
    try:
        code, body = http_json(base, "/ingest", {"entity_id": entity, "textual_content": "while node-1 is stopped"},
                               timeout=300)
        stopped = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert code == 201, body
    assert stopped  # acknowledged by the new primary, not by node-1 once it ran again
    code, found = http_json(base, "/memory/inspect", {"memory_id": body["memory_id"]})
    assert code == 200 and found["textual_content"] == "while node-1 is stopped", found
    code, status = http_json(base, "/admin/cluster")
    assert status["owner"][shard_of(entity, status["shards"])] == "node-0" and status["failovers"] >= 1, status


def test_the_watch_runs_on_the_loop_of_the_requests(cluster):
    """An event loop that closed while the watch slept took the watch with it (the session's
    cluster outlives each test's loop): the next loop's waiting requests get a watch of their own."""
    def attempt_on_a_new_loop():
        loop = asyncio.new_event_loop()

        async def one():
            await cluster.routing.execute(0, lambda node: asyncio.sleep(0.01, node.name))
            return cluster.routing._watch

        watch = loop.run_until_complete(one())
        loop.close()  # the watch still sleeps: it is never resumed, its `finally` never runs
        return watch, loop

    first, _ = attempt_on_a_new_loop()
    second, loop = attempt_on_a_new_loop()
    assert second is not first and second.get_loop() is loop
