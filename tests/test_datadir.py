"""The data directory is private (0700 folders, 0600 files) and one engine holds it at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import BIN
from test_e2e_sdk import client_post


def loose_modes(root) -> list[tuple[str, str]]:
    """Paths under `root` (and root itself) that group or others may use."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if not path.is_symlink() and mode & 0o077:
            found.append((str(path.relative_to(root.parent)), oct(mode & 0o777)))
    return found


def test_engine_keeps_its_files_private(make_server, tmp_path):
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    os.chmod(data, 0o755)  # an existing, world-readable data dir is tightened at start
    (data / "ranking_config.json").write_text("{}")
    os.chmod(data / "ranking_config.json", 0o644)
    server = make_server(data_dir=data).start()
    client_post(server, "/ingest/batch", {"items": [
        {"entity_id": f"user:{i}", "textual_content": f"User {i} keeps a locker code {i}{i}71"} for i in range(20)]})
    assert client_post(server, "/query/semantic", {"textual_query": "locker code", "entity_id": "user:3"})
    time.sleep(1.5)  # the write-behind index reaches Chroma after half a second without writes
    assert server.stop() == 0
    files = [p for p in data.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"store.sqlite3", "chroma.sqlite3"} <= names, names  # the engine's own files are checked
    assert any(p.suffix == ".onnx" for p in files), names
    assert not loose_modes(data)


def test_second_engine_on_one_data_dir_exits_at_once(make_server, tmp_path):
    first = make_server().start()
    second = make_server(data_dir=first.data_dir)
    started = time.monotonic()
    proc = subprocess.Popen([str(BIN / "tellodb"), "serve"], env=second.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:  # it started a second engine: stop its whole tree
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, out
    assert f"pid {first.proc.pid}" in out and f"127.0.0.1:{first.port}" in out, out
    assert "Ray" not in out  # refused before any start-up work
    assert elapsed < 60, elapsed  # far below an engine's start-up, which loads Ray and the model

    os.kill(first.proc.pid, signal.SIGKILL)  # a crashed engine leaves no lock behind
    first.proc.wait(timeout=30)
    third = make_server(data_dir=first.data_dir).start()
    assert client_post(third, "/ingest", {"entity_id": "user:x", "textual_content": "still works"})["status"] == "ok"


def test_a_start_with_another_shard_count_is_refused(make_server, tmp_path):
    """The shard count is fixed for the life of the data: another one would strand every entity."""
    first = make_server(TELLODB_SHARDS="8").start()
    client_post(first, "/ingest", {"entity_id": "user:kept", "textual_content": "still reachable"})
    assert first.stop() == 0
    second = make_server(data_dir=first.data_dir, TELLODB_SHARDS="16")
    proc = subprocess.run([str(BIN / "tellodb"), "serve"], env=second.env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "holds 8 shards but shards is set to 16" in proc.stderr and "Ray" not in proc.stderr, proc.stderr
    third = make_server(data_dir=first.data_dir, TELLODB_SHARDS="8").start()  # the right count still starts
    hits = client_post(third, "/query/semantic", {"textual_query": "reachable", "entity_id": "user:kept"})
    assert hits[0]["textual_content"] == "still reachable"


def test_a_data_dir_records_what_it_was_written_with(tmp_path):
    from router import datadir

    datadir.check_identity(str(tmp_path), datadir.identity(8, "m", 384))
    datadir.check_identity(str(tmp_path), datadir.identity(8, "m", 384))  # the same: fine
    for wanted, says in ((datadir.identity(8, "m", 768), "384-dimensional"), (datadir.identity(4, "m", 384), "8 shards")):
        try:
            datadir.check_identity(str(tmp_path), wanted)
        except datadir.DataDirMismatch as exc:
            assert says in str(exc)
        else:
            raise AssertionError(f"{wanted} was accepted")
    old = tmp_path / "old"
    (old / "shards" / "0011").mkdir(parents=True)  # from before engine.json, written with 12+ shards
    try:
        datadir.check_identity(str(old), datadir.identity(8, "m", 384))
    except datadir.DataDirMismatch as exc:
        assert "shard 11" in str(exc)
    else:
        raise AssertionError("a data dir with shard 11 started with 8 shards")
