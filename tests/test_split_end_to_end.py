"""Shards that split, end to end through the official SDK and `tellodb cluster split`: a data directory
written by an earlier release (tests/fixtures/old_datadir, commit 85ba0ea) starts and splits with
`tellodb serve`; with replicas, the halves' followers are copied again. A split under acknowledged
load through two routers, with no client error and nothing lost: tests/test_many_machines.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from tellodb import TellodbClient

from conftest import API_KEY, BIN, cluster_status, fixed_answers, write_fixed
from test_many_machines import FIXED, FIXED_TEXTS

OLD = Path(__file__).parent / "fixtures" / "old_datadir"


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tellodb"), "cluster", *args, "--url", url, "--key", API_KEY],
                          capture_output=True, text=True, timeout=600)


def status(url: str) -> dict:
    found = cli(url, "status", "--json")
    assert found.returncode == 0, found.stderr
    return json.loads(found.stdout)


def everything_is_there(client: TellodbClient, written: list[dict]) -> None:
    for m in written:
        found = client.inspect_memory(m["memory_id"])
        assert found["entity_id"] == m["entity_id"] and found["textual_content"] == m["text"], m["memory_id"]


def answers(client: TellodbClient, entities: list[str]) -> dict:
    found = {e: [h.memory_id for h in client.query("where does this user live", entity_id=e, top_k=4)]
             for e in entities}
    found["*"] = sorted(h.memory_id for h in client.query("what does the user like", top_k=100))
    found["edges"] = {e: sorted(json.dumps(x, sort_keys=True) for x in client.graph_query(e, user_id=e)["edges"])
                      for e in entities}
    found["all edges"] = {e: sorted(json.dumps(x, sort_keys=True) for x in client.graph_query(e)["edges"])
                          for e in entities}
    return found


def test_an_old_data_directory_starts_and_splits(make_server, tmp_path):
    written = json.loads((OLD / "written.json").read_text())["memories"]
    entities = sorted({m["entity_id"] for m in written})
    data = tmp_path / "data"
    shutil.copytree(OLD / "data", data)
    server = make_server(data_dir=data, TELLODB_SHARDS="4").start()
    try:
        client = TellodbClient.from_cloud(base_url=server.base_url, api_key=API_KEY)
        everything_is_there(client, written)
        before = answers(client, entities)
        assert len(before["*"]) == len(written)
        sizes = {s: sum(m["shard"] == s for m in written) for s in range(4)}
        largest = max(sizes, key=sizes.get)

        done = cli(server.base_url, "split")  # no shard named: the largest
        assert done.returncode == 0, done.stderr
        assert f"split: shard {largest} and new shard 4" in done.stderr
        after = status(server.base_url)
        assert after["shards"] == 5 and not after["moving"] and not after["error"]
        split = [h for h in after["history"] if h.get("split")]
        assert [(h["shard"], h["child"], h["state"]) for h in split] == [(largest, 4, "done")]
        everything_is_there(client, written)
        assert answers(client, entities) == before
        on_new = [m for m in written if client.inspect_memory(m["memory_id"])["shard"] == 4]
        assert on_new and all(m["shard"] == largest for m in on_new)  # half of one shard moved, nothing else

        again = cli(server.base_url, "split", "4")  # the new shard splits too
        assert again.returncode == 0, again.stderr
        client.ingest(entity_id=entities[0], text=f"{entities[0]} adopted a cat", memory_id=f"{entities[0]}::notes::9",
                      timestamp=1_700_000_000_009)
        assert server.stop() == 0
        server.start()  # the split placement and the halves are read back
        assert status(server.base_url)["shards"] == 6
        everything_is_there(client, written)
        assert client.inspect_memory(f"{entities[0]}::notes::9")["textual_content"] == f"{entities[0]} adopted a cat"
        assert answers(client, entities)["*"] == sorted([*before["*"], f"{entities[0]}::notes::9"])

        backup = subprocess.run([str(BIN / "tellodb"), "backup", str(tmp_path / "backup"), "--url", server.base_url,
                                 "--key", API_KEY], capture_output=True, text=True, timeout=300)
        assert backup.returncode == 0, backup.stderr
        restored = tmp_path / "restored"
        done = subprocess.run([str(BIN / "tellodb"), "restore", str(tmp_path / "backup"), "--data-dir", str(restored)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        server.stop()
        again = make_server(data_dir=restored, TELLODB_SHARDS="4").start()  # a split cluster's backup, restored
        client = TellodbClient.from_cloud(base_url=again.base_url, api_key=API_KEY)
        assert status(again.base_url)["shards"] == 6
        everything_is_there(client, written)
        assert answers(client, entities)["*"] == sorted([*before["*"], f"{entities[0]}::notes::9"])
    finally:
        server.kill()


def test_with_replicas_a_split_shards_copies_are_made_again_and_serve_after_a_failover(replicated):
    """The followers of a split shard held all of it: they are dropped and copied again from the
    primary's halves, so a follower promoted later holds its half, no more (a global query over
    it counts each memory once)."""
    from test_replicas import wait_fully_replicated

    c = replicated
    c.start_head()
    c.start_nodes(["n1", "n2", "n3"])
    [router] = c.start_routers(1)
    client = TellodbClient.from_cloud(base_url=router.url, api_key=API_KEY)
    write_fixed(client, FIXED, FIXED_TEXTS)
    before = fixed_answers(client, FIXED)
    first = wait_fully_replicated(c, router.url)
    shard = 5
    primary = first["replicas"][shard][0]

    done = c.cli("cluster", "split", str(shard), "--url", router.url, "--key", API_KEY)
    assert done.returncode == 0, done.stderr
    after = wait_fully_replicated(c, router.url)
    assert after["shards"] == 9 and all(len(copies) == 2 for copies in after["replicas"])
    for detail in after["shards_detail"]:
        assert detail["lag"] == 0 and len({copy["seq"] or 0 for copy in detail["copies"]}) == 1, detail
    assert fixed_answers(client, FIXED) == before

    c.kill(after["replicas"][shard][0])  # the halves' primary: their new copies take over
    deadline = time.monotonic() + 60
    while (s := cluster_status(c, router.url))["owner"][shard] == after["replicas"][shard][0]:
        assert time.monotonic() < deadline, "no failover"
        time.sleep(1)
    assert fixed_answers(client, FIXED) == before
    copied = {(h["shard"], h["to"]) for h in s["history"] if h["from"] is None and h["state"] == "done"}
    assert {shard, 8} <= {s_ for s_, _ in copied}  # both halves got their follower copy from the primary
    assert any(h.get("split") and h["to"] == primary for h in s["history"])
