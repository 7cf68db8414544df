"""End to end: `tellodb serve` as a subprocess, driven with the official SDK (tellodb 0.1.3)."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from tellodb import IngestItem, TellodbClient
from tellodb.client import TellodbHTTPError

from conftest import API_KEY, BIN, free_port


def client(server) -> TellodbClient:
    return TellodbClient.from_cloud(base_url=server.base_url, api_key=API_KEY)


def stats(server) -> dict:
    req = urllib.request.Request(server.base_url + "/stats", headers={"x-api-key": API_KEY})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_walkthrough_restart_and_durability(make_server):
    server = make_server().start()
    c = client(server)
    assert c.health() == {"status": "ok"}
    assert c.engine_version().auth_required is True
    assert f"Memory Engine live address=127.0.0.1:{server.port}" in server.log_text()

    # The seed's walkthrough.
    c.ingest(entity_id="user:sarah", text="User prefers dark mode and uses a screen reader")
    c.ingest(entity_id="user:sarah", text="User works at Acme Corp as a software engineer")
    hits = c.query("What are the user's accessibility preferences?", entity_id="user:sarah", top_k=5)
    assert hits[0].textual_content == "User prefers dark mode and uses a screen reader"
    assert len(hits) == 2 and all(0 <= h.similarity <= 1 for h in hits)
    c.ingest(entity_id="user:sarah", text="Session turn", memory_id="user:sarah::session-1::0")
    details = c.inspect_memory(memory_id="user:sarah::session-1::0")
    assert details["session_id"] == "session-1" and details["turn_index"] == 0

    # Bulk and concurrent writes: every acknowledged one must be found.
    c.ingest_many([IngestItem(entity_id="bulk", text=f"bulk memory {i} token{i}qz", memory_id=f"bulk::b::{i}")
                   for i in range(200)], batch_size=64)

    def writer(w: int) -> list[str]:
        mine = client(server)
        ids = []
        for i in range(15):
            mid = f"w{w}::c::{i}"
            mine.ingest(entity_id=f"w{w}", text=f"writer {w} wrote line {i} — naïve café ✓", memory_id=mid)
            ids.append(mid)
        return ids

    with ThreadPoolExecutor(8) as pool:
        written = [mid for ids in pool.map(writer, range(8)) for mid in ids]
    for w in range(8):
        assert len(c.query("line", entity_id=f"w{w}", top_k=100)) == 15
    assert len(c.query("bulk memory", entity_id="bulk", top_k=1000)) == 200

    # Upserts and deletes.
    c.ingest(entity_id="bulk", text="replaced text token7qz", memory_id="bulk::b::7")
    assert c.delete_memory("bulk::b::3")["deleted"] is True
    with pytest.raises(TellodbHTTPError) as err:
        c.inspect_memory("bulk::b::3")
    assert err.value.status_code == 404

    # Graceful stop, then a restart on the same data.
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 30
    assert "Stopped code=0" in server.log_text()

    again = make_server(data_dir=server.data_dir).start()
    c = client(again)
    for mid in written:
        assert c.inspect_memory(mid)["memory_id"] == mid
    assert len(c.query("bulk memory", entity_id="bulk", top_k=1000)) == 199
    assert c.query("token7qz", entity_id="bulk", top_k=1)[0].textual_content == "replaced text token7qz"
    with pytest.raises(TellodbHTTPError):
        c.inspect_memory("bulk::b::3")
    assert c.query("token3qz", entity_id="bulk", top_k=1)[0].memory_id != "bulk::b::3"
    s = stats(again)
    assert s["memories"] == 2 + 1 + 199 + 120


def test_kill_minus_9_loses_no_acknowledged_write(make_server):
    server = make_server().start()
    c = client(server)
    acknowledged = []
    for i in range(40):
        mid = f"crash::s::{i}"
        c.ingest(entity_id="crash", text=f"unique marker tok{i}qz in memory {i}", memory_id=mid)
        acknowledged.append(mid)
    server.kill()  # SIGKILL to the whole process tree: server, Ray, node actors

    again = make_server(data_dir=server.data_dir).start()
    c = client(again)
    for i, mid in enumerate(acknowledged):
        assert c.inspect_memory(mid)["memory_id"] == mid
        assert c.query(f"tok{i}qz", entity_id="crash", top_k=1)[0].memory_id == mid  # lexical path
    nodes = [n for n in stats(again)["nodes"].values() if n]
    assert sum(n["memories"] for n in nodes) == 40
    assert sum(n["vectors"] for n in nodes) == 40  # every vector is in the HNSW index again
    assert sum(n["unindexed"] for n in nodes) == 0
    # The vector path alone: a paraphrase with no shared word still finds it.
    c.ingest(entity_id="crash", text="My favourite animal is the giraffe", memory_id="crash::s::99")
    assert c.query("tall african mammal with a long neck", entity_id="crash", top_k=1)[0].memory_id == "crash::s::99"


def port_is_free(port: int) -> bool:
    """Nobody listens there (TIME_WAIT leftovers of closed connections do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_sdk_from_local_finds_temporal_memory(tmp_path, monkeypatch):
    for var in list(os.environ):
        if var.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_")) or var == "PORT":
            monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TELLODB_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TELLODB_SHARDS", "8")
    port = free_port()
    c = TellodbClient.from_local(port=port, api_key=API_KEY, data_dir=tmp_path / "data")
    try:
        assert c.health() == {"status": "ok"}
        c.ingest(entity_id="local", text="from_local works")
        assert c.query("works", entity_id="local", top_k=1)[0].textual_content == "from_local works"
        assert (tmp_path / "data" / "shards").is_dir()
        pid = c._engine_manager.process.pid
    finally:
        c.stop_local_engine()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not port_is_free(port):
        time.sleep(0.2)
    assert port_is_free(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def run_cli(args, env_extra, tmp_path, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
    env.pop("PORT", None)
    env.update({"TEMPORAL_MEMORY_DATA_DIR": str(tmp_path / "d")}, **env_extra)
    return subprocess.run([str(BIN / "tellodb"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("env_extra, args, named", [
    ({"TEMPORAL_MEMORY_HOST": "0.0.0.0"}, ["serve"], "TELLODB_API_KEY"),
    ({"TELLODB_HNSW_EF_SEARCH": "abc"}, ["serve"], "TELLODB_HNSW_EF_SEARCH"),
    ({"TEMPORAL_MEMORY_EMBEDDING_BACKEND": "candle"}, ["serve"], "TEMPORAL_MEMORY_EMBEDDING_BACKEND"),
    ({}, ["serve", "--config", "BAD_YAML"], "shardz"),
])
def test_bad_configuration_refuses_to_start_and_names_the_key(tmp_path, env_extra, args, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shardz: 4\n")
    args = [str(bad) if a == "BAD_YAML" else a for a in args]
    result = run_cli(args, env_extra, tmp_path)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_and_version(tmp_path):
    assert "serve" in run_cli(["--help"], {}, tmp_path).stdout
    assert run_cli(["--version"], {}, tmp_path).stdout.startswith("tellodb-cluster ")
