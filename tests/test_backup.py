"""`tellodb backup` of a running engine while 8 clients write, and `tellodb restore` into a new data
directory that `tellodb serve` starts on, with the same answers. Real servers, the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time

import pytest

from conftest import API_KEY, BIN, http_json
from node.control.placement import Placement

QUERIES = ["where does the user live", "favourite food", "the dog's name", "locker code", "weekend plans"]
FACTS = ["I live in {city}", "My favourite food is {food}", "Our dog is called {dog}", "My locker code is {n}",
         "This weekend I will visit {city} with {dog}"]


def answers(base: str, entities: list[str]) -> list:
    out = []
    for e in entities:
        for q in QUERIES:
            status, hits = http_json(base, "/query/semantic", {"textual_query": q, "entity_id": e, "limit": 5})
            assert status == 200, hits
            out.append([(h["memory_id"], round(h["similarity"], 6)) for h in hits])
    return out


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tellodb"), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    """A source engine, a backup taken while 8 clients wrote, and what was acknowledged before it."""
    from conftest import Server, free_port
    import os

    root = tmp_path_factory.mktemp("backup")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
    env.update({"TEMPORAL_MEMORY_HOST": "127.0.0.1", "TEMPORAL_MEMORY_PORT": str(free_port()),
                "TEMPORAL_MEMORY_DATA_DIR": str(root / "source"), "TEMPORAL_MEMORY_API_KEY": API_KEY,
                "TELLODB_SHARDS": "8", "HF_HUB_OFFLINE": "1"})
    (root / "source").mkdir()
    source = Server(root / "source", int(env["TEMPORAL_MEMORY_PORT"]), env, root / "source.log").start()
    base = source.base_url
    placement = Placement(8, ("node-0", "node-1"))
    # Entities read back later live on shards 0-3; the writers during the backup use shards 4-7,
    # so the shards the queries read are the same in the source and in the backup.
    fixed = [e for e in (f"user:{i}" for i in range(200)) if placement.shard_of(e) < 4][:6]
    busy = [e for e in (f"busy:{i}" for i in range(200)) if placement.shard_of(e) >= 4][:8]
    items = [{"entity_id": e, "memory_id": f"{e}::s::{k}", "timestamp": 1_700_000_000_000 + k,
              "textual_content": f.format(city=["Lisbon", "Oslo", "Lima"][i % 3], food=["ramen", "tacos"][i % 2],
                                          dog=["Rex", "Bo"][i % 2], n=4000 + i)}
             for i, e in enumerate(fixed) for k, f in enumerate(FACTS)]
    assert http_json(base, "/ingest/batch", {"items": items})[0] == 201

    acked: list[tuple[float, str]] = []  # (time acknowledged, memory id) of the writers' ingests
    stop = threading.Event()

    def writer(entity: str) -> None:
        k = 0
        while not stop.is_set():
            mid = f"{entity}::w::{k}"
            status, _ = http_json(base, "/ingest", {"entity_id": entity, "memory_id": mid,
                                               "textual_content": f"note {k} written during the backup"})
            assert status == 201
            acked.append((time.monotonic(), mid))
            k += 1

    threads = [threading.Thread(target=writer, args=(e,)) for e in busy]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < 16 and time.monotonic() < deadline:  # every writer is under way
        time.sleep(0.1)
    started = time.monotonic()
    done = cli("backup", str(root / "backup"), "--url", base, "--key", API_KEY)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert done.returncode == 0, done.stderr
    before = [m for at, m in acked if at < started]
    yield {"root": root, "source": source, "fixed": fixed, "before": before, "acked": acked, "log": done.stderr}
    source.kill()


def test_restore_has_every_write_acknowledged_before_the_backup_and_the_same_answers(backed_up, make_server):
    root, source = backed_up["root"], backed_up["source"]
    assert len(backed_up["before"]) >= 8 and len(backed_up["acked"]) > len(backed_up["before"])
    assert "backup [" in backed_up["log"] and "8/8 shards" in backed_up["log"]  # the progress bar
    manifest = json.loads((root / "backup" / "manifest.json").read_text())
    assert manifest["shards"] == 8 and manifest["dimension"] == 384 and len(manifest["files"]) == 8
    assert all(len(f["sha256"]) == 64 and f["seq"] >= 0 for f in manifest["files"].values())

    done = cli("restore", str(root / "backup"), "--data-dir", str(root / "restored"))
    assert done.returncode == 0, done.stderr
    restored = make_server(data_dir=root / "restored").start()
    for memory_id in backed_up["before"] + [f"{backed_up['fixed'][0]}::s::0"]:
        assert http_json(restored.base_url, "/memory/inspect", {"memory_id": memory_id})[0] == 200, memory_id
    assert answers(restored.base_url, backed_up["fixed"]) == answers(source.base_url, backed_up["fixed"])


def test_restore_refuses_a_corrupt_file_a_missing_shard_and_a_used_directory(backed_up, tmp_path):
    good = backed_up["root"] / "backup"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    data = bytearray((corrupt / "shards/0003/store.sqlite3").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "shards/0003/store.sqlite3").write_bytes(bytes(data))
    done = cli("restore", str(corrupt), "--data-dir", str(tmp_path / "a"))
    assert done.returncode == 1 and "shard 3" in done.stderr and "corrupt" in done.stderr, done.stderr
    assert not (tmp_path / "a").exists()  # checked before anything is written

    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "shards/0005/store.sqlite3").unlink()
    done = cli("restore", str(missing), "--data-dir", str(tmp_path / "b"))
    assert done.returncode == 1 and "shard 5 is missing" in done.stderr, done.stderr

    used = tmp_path / "used"
    used.mkdir()
    (used / "something").write_text("x")
    done = cli("restore", str(good), "--data-dir", str(used))
    assert done.returncode == 1 and "not empty" in done.stderr, done.stderr
    done = cli("restore", str(good), "--data-dir", str(used), "--force")
    assert done.returncode == 0, done.stderr
    assert (used / "shards/0007/store.sqlite3").is_file() and (used / "engine.json").is_file()

    done = cli("backup", str(good), "--url", backed_up["source"].base_url, "--key", API_KEY)
    assert done.returncode == 1 and "not empty" in done.stderr  # a backup never overwrites another
