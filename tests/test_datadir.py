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
