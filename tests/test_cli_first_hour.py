"""What a new user meets first with the command line: `tellodb keys` works without a keys file
configured (the default is <data_dir>/keys.yaml, which the engine reads too), the audit file lives
in the data directory whatever the working directory, and a failing command (a wrong key, a URL that
does not answer, a bad URL, something that is not an engine) prints one line and exits non-zero."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import urllib.request

from conftest import BIN, free_port


def tellodb(*args: str, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tellodb"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
    env.pop("PORT", None)
    return {**env, **extra}


def one_line_failure(done: subprocess.CompletedProcess, says: str) -> None:
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr, done.stderr


def test_key_commands_need_no_keys_file_and_audit_in_the_data_directory(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(TELLODB_DATA_DIR=str(data))
    added = tellodb("keys", "add", "agent", "--role", "read", "--prefix", "acme:", env=env, cwd=elsewhere)
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip().startswith("tdb_") and str(data / "keys.yaml") in added.stderr
    listed = tellodb("keys", "list", env=env, cwd=elsewhere)
    assert listed.returncode == 0 and listed.stdout.split() == ["agent", "read", "acme:"], listed
    assert "key_add" in (data / "audit.log").read_text()
    # A relative audit_file is a name in the data directory, not in the working directory.
    revoked = tellodb("keys", "revoke", "agent", env={**env, "TELLODB_AUDIT_FILE": "trail.log"}, cwd=elsewhere)
    assert revoked.returncode == 0, revoked.stderr
    assert "key_revoke" in (data / "trail.log").read_text()
    assert list(elsewhere.iterdir()) == []
    assert "<data_dir>/keys.yaml" in " ".join(tellodb("keys", "--help", env=env, cwd=elsewhere).stdout.split())


def test_failing_commands_print_one_line(tmp_path):
    env, closed = clean_env(), f"http://127.0.0.1:{free_port()}"
    for args in (("cluster", "status", "--url", closed), ("backup", str(tmp_path / "b1"), "--url", closed)):
        one_line_failure(tellodb(*args, "--key", "k" * 12, env=env, cwd=tmp_path), "cannot reach")
    for url in ("127.0.0.1:3000", "http://[::1"):
        one_line_failure(tellodb("backup", str(tmp_path / "b2"), "--url", url, "--key", "k" * 12, env=env,
                                 cwd=tmp_path), "is not a URL")

    class Page(http.server.BaseHTTPRequestHandler):  # a web server that is no engine
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_port}"
        for args in (("cluster", "status", "--url", url), ("backup", str(tmp_path / "b3"), "--url", url)):
            one_line_failure(tellodb(*args, "--key", "k" * 12, env=env, cwd=tmp_path), "did not answer with JSON")
    finally:
        other.shutdown()


def test_a_wrong_key_is_one_line_and_a_key_from_the_default_file_works(make_server, tmp_path):
    data = tmp_path / "data"
    env = clean_env(TELLODB_DATA_DIR=str(data))
    secret = tellodb("keys", "add", "ops", "--role", "admin", env=env, cwd=tmp_path).stdout.strip()
    server = make_server(data_dir=data).start()
    for args in (("cluster", "status"), ("backup", str(tmp_path / "b"))):
        one_line_failure(tellodb(*args, "--url", server.base_url, "--key", "wrong-key-123", env=env, cwd=tmp_path),
                         "401")
    req = urllib.request.Request(server.base_url + "/admin/shards", headers={"x-api-key": secret})
    with urllib.request.urlopen(req, timeout=30) as r:  # the engine reads <data_dir>/keys.yaml by default
        assert r.status == 200
    done = tellodb("backup", str(tmp_path / "b"), "--url", server.base_url, "--key", secret, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
