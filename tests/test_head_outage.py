"""Losing the head: a head, three `tellodb node`s (`replication: 2`) and two routers on this
machine under acknowledged load; every process of the head is killed (a lost machine) and started
again later. Nothing is restarted by hand: nodes and routers serve meanwhile, rejoin by themselves,
and no acknowledged write is lost (read back after one more node is killed, so that the other
copies answer). With GCS fault tolerance on a real Redis the same node actors go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import API_KEY, cluster_status, http_json
from loadtest.local_cluster import LocalCluster, free_port
from loadtest.mixed_load import MixedLoad

ROLES = ("n1", "n2", "n3", "router-0", "router-1")




def wait_healed(c: LocalCluster, url: str, timeout: float = 120) -> dict:
    """Until every shard has its two copies live at the same seq (cluster status through `url`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        done = c.cli("cluster", "status", "--json", "--url", url, "--key", API_KEY)
        if done.returncode == 0:
            last = json.loads(done.stdout)
            if (not last["under_replicated"] and not last["down"] and not last.get("rejoining")
                    and all(len(s["copies"]) == 2 and all(cp["live"] for cp in s["copies"])
                            for s in last["shards_detail"])):
                return last
        time.sleep(0.5)
    still_running(c)  # a role that died says why
    raise AssertionError(f"not healed within {timeout:g} s: {json.dumps(last)[:2000] if last else done.stderr}")


def same_seq(status: dict) -> None:
    for shard in status["shards_detail"]:
        assert len({copy["seq"] or 0 for copy in shard["copies"]}) == 1, json.dumps(shard)


def all_acked_present(c: LocalCluster, url: str, load: MixedLoad) -> None:
    """Kill one more node (so that other copies answer) and read every acknowledged write back."""
    c.kill("n2")
    time.sleep(6)  # failover_after_s: 2, and the routers' reads move to the followers
    missing = load.missing(url)
    assert not missing, f"{len(missing)} of {len(load.acked)} acknowledged writes not found: {missing[:5]}"


def still_running(c: LocalCluster) -> None:
    for name in ROLES:
        if name in c.procs:
            assert c.procs[name].popen.poll() is None, f"{name} exited:\n{c.procs[name].log_text()[-3000:]}"


def start(c: LocalCluster, head_env: dict | None = None):
    c.start_head(env=head_env)
    c.start_nodes(["n1", "n2", "n3"])
    r1, r2 = c.start_routers(2)
    wait_healed(c, r1.url)
    load = MixedLoad([r1.url, r2.url], API_KEY, entities=12).start()
    time.sleep(3)
    return r1, r2, load


def outage(c: LocalCluster, load: MixedLoad, seconds: float, head_env: dict | None = None,
           head_args: tuple[str, ...] = (), during=None) -> tuple[float, float]:
    """Kill the head for `seconds` (calling `during()` in the middle), start it again; (when it was
    back, writes acknowledged while away)."""
    c.kill("head")
    acked_before = len(load.acked)
    time.sleep(seconds / 2)
    if during is not None:
        during()
    time.sleep(seconds / 2)
    still_running(c)
    during = len(load.acked) - acked_before
    c.start_head(env=head_env, args=head_args)
    return time.monotonic(), during


def test_a_head_outage_without_redis_is_healed_by_the_nodes_and_routers(replicated):
    """No GCS fault tolerance: the head comes back as a new Ray cluster; each node starts its Ray
    node and actor again on its name and data, each router joins again."""
    c = replicated
    r1, r2, load = start(c)
    back, during = outage(c, load, 60, during=lambda: head_away(r1.url))
    assert during > 0, "no write was acknowledged while the head was away"
    healed = wait_healed(c, r1.url, timeout=60)  # within 60 s of the head's return
    heal_s = time.monotonic() - back
    time.sleep(2)
    load.stop()
    still_running(c)
    same_seq(cluster_status(c, r1.url))
    statuses = [e[2] for e in load.errors]
    assert not [s for s in statuses if "HTTP 503" not in s], statuses[:5]  # never a 500, nor a lost connection
    late = [t - back for t in load.error_at if not -1 <= t - back <= heal_s]
    assert not late, f"errors outside the rejoin: {late[:5]} s after the head's return"
    assert len({t // 1 for t in load.error_at}) <= 5, (statuses[:5], [t - back for t in load.error_at])
    for name in ("n1", "n2", "n3"):
        assert "joining again" in c.procs[name].log_text(), name  # each node rejoined by itself
    for name in ("router-0", "router-1"):
        assert "Router joined the cluster again" in c.procs[name].log_text(), name
    assert healed["epoch"] >= 1
    all_acked_present(c, r2.url, load)


def actor_pids(url: str) -> dict[str, int]:
    code, stats = http_json(url, "/stats")
    assert code == 200, stats
    return {name: node["pid"] for name, node in stats["nodes"].items()}


def head_away(url: str) -> None:
    """With the head away a router stays ready (it routes by the last placement) and says the
    authority is not there; a member change waits for it: 503 with a reason and Retry-After."""
    code, ready = http_json(url, "/ready")
    assert code == 200 and ready["ready"] and ready["authority_up"] is False, ready
    req = urllib.request.Request(url + "/admin/nodes", data=json.dumps({"name": "n1"}).encode(), method="POST",
                                 headers={"x-api-key": API_KEY, "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=60)
    body = json.loads(refused.value.read())
    assert refused.value.code == 503 and body["error"]["code"] == "unavailable", body
    assert "placement authority" in body["error"]["message"] and refused.value.headers["Retry-After"] == "1"


def redis_server() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if not found:
        pytest.skip("no redis-server here (`make ops-deps` installs Debian's): GCS fault tolerance needs one")
    return found


@pytest.fixture
def redis(tmp_path):
    binary = redis_server()
    port, password = free_port(), "test-redis-password-7f3a"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            import socket

            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.2)
        yield {"RAY_REDIS_ADDRESS": f"127.0.0.1:{port}", "RAY_REDIS_PASSWORD": password,
               "RAY_external_storage_namespace": "tellodb-test"}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_with_gcs_fault_tolerance_a_head_outage_costs_nothing(replicated, redis):
    """The head keeps the GCS in Redis: the same cluster comes back, the same node actors go on,
    and the restarted authority finds them (failover works again). One 60 s outage, then two
    short ones (the loss seen before was intermittent)."""
    c = replicated
    r1, r2, load = start(c, head_env=redis)
    pids = actor_pids(r1.url)
    for seconds in (60, 5, 5):
        outage(c, load, seconds, head_env=redis)
        wait_healed(c, r1.url, timeout=60)
    time.sleep(2)
    load.stop()
    still_running(c)
    assert load.errors == [], load.errors[:5]
    after = cluster_status(c, r1.url)
    same_seq(after)
    for name in ("n1", "n2", "n3"):
        assert "joining again" not in c.procs[name].log_text(), name  # the same cluster: nothing to rejoin
    assert actor_pids(r1.url) == pids  # the same node actors
    all_acked_present(c, r2.url, load)
    status = cluster_status(c, r1.url)
    assert "n2" in status["down"] and "n2" not in status["owner"]  # the restarted authority failed n2 over


def test_a_head_killed_during_a_move_and_one_on_an_empty_disk(replicated):
    """The head is killed while a shard moves to a new node: afterwards each shard has one owner and
    every acknowledged write is there. Then the head's disk is lost: a head on an empty data
    directory (given the cluster's token) rebuilds the same placement from the nodes."""
    c = replicated
    token = c.root / "ray_token"
    c.start_head()
    shutil.copy(c.root / "head" / "ray_auth_token", token)
    c.env["TELLODB_RAY_TOKEN_FILE"] = str(token)  # nodes and routers hold a copy of the token
    c.start_nodes(["n1", "n2", "n3"])
    r1, r2 = c.start_routers(2)
    for e in range(12):  # enough in each shard that a move takes a while
        code, answer = http_json(r1.url, "/ingest/batch", {"items": [
            {"entity_id": f"bulk:user-{e}", "text": f"bulk memory {i} of user {e} about tea and maps"}
            for i in range(150)]})
        assert code == 201, answer
    load = MixedLoad([r1.url, r2.url], API_KEY, entities=12).start()
    c.start_nodes(["n4"])
    code, answer = http_json(r1.url, "/admin/nodes", {"name": "n4"})
    assert code == 202, answer
    deadline = time.monotonic() + 60
    while not http_json(r1.url, "/admin/cluster")[1].get("moving"):
        assert time.monotonic() < deadline, "no move started"
        time.sleep(0.05)
    c.kill("head")  # in the middle of a move
    time.sleep(10)
    c.start_head()
    deadline = time.monotonic() + 180
    while True:  # the moves go on (or start again) until n4 has its share
        code, s = http_json(r1.url, "/admin/cluster")
        if code == 200 and not s["pending_moves"] and not s["moving"] and not s["rejoining"]:
            break
        assert time.monotonic() < deadline, json.dumps(s)[:2000]
        time.sleep(1)
    moved = wait_healed(c, r1.url, timeout=60)
    assert moved["error"] is None and any("n4" in copies for copies in moved["replicas"])
    stats = {name: set(json.loads(c.cli("cluster", "status", "--json", "--url", r1.url, "--key", API_KEY).stdout)
                       ["members"][name]["copies"]) for name in ("n1", "n2", "n3", "n4")}
    for shard, copies in enumerate(moved["replicas"]):
        assert len(copies) == 2 and moved["owner"][shard] == copies[0]
        assert {n for n, held in stats.items() if shard in held} == set(copies), (shard, stats)

    c.kill("head")  # the disk is lost too
    shutil.rmtree(c.root / "head")
    c.start_head(args=("--ray-token-file", str(token)))
    rebuilt = wait_healed(c, r1.url, timeout=90)
    head_log = c.procs["head"].log_text()  # the rebuilt placement is the one the nodes brought
    assert any(f"Placement taken from node {n} epoch={moved['epoch']} " in head_log for n in stats), head_log[-3000:]
    if rebuilt["epoch"] == moved["epoch"]:  # else a node slow to answer after the restart was failed over since
        assert (rebuilt["owner"], rebuilt["replicas"]) == (moved["owner"], moved["replicas"])
    assert rebuilt["epoch"] >= moved["epoch"]
    assert not rebuilt["recovering"] and (c.root / "head" / "placement.json").exists()
    time.sleep(2)
    load.stop()
    still_running(c)
    assert not [e for e in load.errors if "HTTP 503" not in e[2]], load.errors[:5]
    all_acked_present(c, r2.url, load)
