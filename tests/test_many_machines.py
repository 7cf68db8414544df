"""One engine over many machines, simulated on this one: a `tellodb head`, `tellodb node`s with their
own data directories and `tellodb router`s, each a separate process tree with its own Ray node.
A node is added, a shard split, and another node removed while mixed load runs through two
routers, one of which is killed half-way; clients of the other see no error, and every
acknowledged write is still there.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from tellodb import TellodbClient

from conftest import API_KEY, cluster_status, check_load, fixed_answers, write_fixed
from loadtest.local_cluster import LocalCluster
from loadtest.mixed_load import MixedLoad
from node.control.placement import Placement

FIXED = [f"fixed:user-{i}" for i in range(12)]
FIXED_TEXTS = ["likes green tea in the morning", "plays the cello on weekends", "moved to Lisbon last spring",
               "is allergic to peanuts", "works night shifts at the hospital", "reads science fiction"]



@pytest.fixture
def local_cluster(tmp_path, model_seed):
    c = LocalCluster(tmp_path / "cluster", API_KEY, shards=16, nodes=("n1", "n2", "n3"), model_seed=model_seed)
    try:
        yield c
    finally:
        c.close()




def shard_files(c: LocalCluster, node: str) -> set[int]:
    folder = c.root / node / "shards"
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.exists() else set()


def test_nodes_join_and_leave_under_load_without_a_client_error(local_cluster):
    c = local_cluster
    c.start_head()
    c.start_nodes(["n1", "n2", "n3"])
    r1, r2 = c.start_routers(2)
    client = TellodbClient.from_cloud(base_url=r1.url, api_key=API_KEY)
    write_fixed(client, FIXED, FIXED_TEXTS)
    before = fixed_answers(client, FIXED)
    assert len(before["*"]) == len(FIXED) and all("::fixed::1" in m for m in before["*"])
    first = cluster_status(c, r1.url)
    assert first["epoch"] >= 1 and sorted(first["nodes"]) == ["n1", "n2", "n3"]
    assert all(m["joined"] for m in first["members"].values())

    load = MixedLoad([r1.url, r2.url], API_KEY, entities=16).start()
    time.sleep(3)

    # a fourth node joins, then gets its share: about 1/N of the shards, all of them onto it
    c.start_nodes(["n4"])
    added = c.cli("cluster", "add-node", "n4", "--url", r1.url, "--key", API_KEY)
    assert added.returncode == 0, added.stderr
    after_add = cluster_status(c, r1.url)
    moved = [s for s in range(16) if after_add["owner"][s] != first["owner"][s]]
    assert moved and all(after_add["owner"][s] == "n4" for s in moved)
    was = Placement(16, ("n1", "n2", "n3", "n4"), replicas=tuple((o,) for o in first["owner"]))
    assert tuple(after_add["owner"]) == tuple(r[0] for r in was.target())  # the balance's choice
    assert len(moved) == 4 and sorted(Counter(after_add["owner"]).values()) == [4, 4, 4, 4]  # its share only
    for s in moved:
        assert (c.root / "n4" / "shards" / f"{s:04d}" / "store.sqlite3").exists()
        assert s not in shard_files(c, first["owner"][s])

    # a shard splits in two while both routers carry the load; the new shard is placed by the balance
    split = c.cli("cluster", "split", "3", "--url", r2.url, "--key", API_KEY)
    assert split.returncode == 0, split.stderr
    after_split = cluster_status(c, r1.url)
    assert after_split["shards"] == 17 and not after_split["moving"] and not after_split["error"]
    [entry] = [h for h in after_split["history"] if h.get("split")]
    assert (entry["shard"], entry["child"], entry["state"]) == (3, 16, "done") and entry["fence_ms"] >= 0
    assert sorted(Counter(after_split["owner"]).values()) == [4, 4, 4, 5]
    for router in (r1, r2):  # both route by the split placement: each memory once in a global query
        c2 = TellodbClient.from_cloud(base_url=router.url, api_key=API_KEY)
        assert sorted(h.memory_id for h in c2.query("who plays the cello", top_k=len(FIXED))) == before["*"]
    time.sleep(2)
    moved_before_removal = [m for m in after_split["history"] if m["state"] == "done" and not m.get("split")]

    # one router dies mid-load; the other's clients go on undisturbed
    load.stop_router(r2.url)
    c.kill(r2.name)

    removed = c.cli("cluster", "remove-node", "n2", "--url", r1.url, "--key", API_KEY)
    assert removed.returncode == 0, removed.stderr
    time.sleep(2)
    load.stop()

    final = cluster_status(c, r1.url)
    assert "n2" not in final["nodes"] and "n2" not in final["owner"] and not final["moving"]
    assert final["epoch"] > after_split["epoch"] > after_add["epoch"] > first["epoch"]
    assert shard_files(c, "n2") == set()  # drained: its shard folders are gone
    for node in ("n1", "n3", "n4"):
        assert shard_files(c, node) <= set(final["members"][node]["shards"])

    check_load(r1.url, load)
    assert fixed_answers(client, FIXED) == before
    moves = [m for m in final["history"] if m["state"] == "done" and not m.get("split")]
    assert len(moved_before_removal) >= len(moved)
    assert len(moves) == len(moved_before_removal) + len(after_split["members"]["n2"]["shards"])
    assert all(m["fence_ms"] >= 0 for m in moves)


def test_a_role_without_the_clusters_ray_token_is_refused(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "RAY_"))}
    tellodb = str(Path(sys.executable).parent / "tellodb")
    for args in (["router", "--address", "127.0.0.1:1", "--port", "0"],
                 ["node", "--address", "127.0.0.1:1", "--name", "n1", "--data-dir", str(tmp_path / "n1")]):
        done = subprocess.run([tellodb, *args], env={**env, "TELLODB_API_KEY": API_KEY}, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "the cluster's Ray token is needed" in done.stderr
