"""`tellodb serve` holds its HTTP port from before Ray starts: Ray's processes take free ports as they
come up, and one took the port a client had been told to poll (the SDK's `from_local` then read Ray's
gRPC answer as a broken HTTP status line). A port someone else holds is refused at once, before the
Ray start it would otherwise wait for."""

from __future__ import annotations

import errno
import socket
import subprocess
import time

import pytest

from conftest import BIN


def wait_for_line(server, line: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while line not in server.log_text():
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {line!r} in:\n{server.log_text()}")
        time.sleep(0.05)


def test_the_port_is_held_while_ray_starts(make_server):
    server = make_server()
    log = open(server.log_path, "ab")
    server.proc = subprocess.Popen([str(BIN / "tellodb"), "serve"], env=server.env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True, cwd=str(server.data_dir.parent))
    wait_for_line(server, "Runtime data root")  # logged before Ray starts
    assert "Cluster ready" not in server.log_text()
    with socket.socket() as other, pytest.raises(OSError) as taken:
        other.bind(("127.0.0.1", server.port))
    assert taken.value.errno == errno.EADDRINUSE
    wait_for_line(server, "Memory Engine live")
    assert server.stop() == 0


def test_a_port_in_use_is_refused_before_ray_starts(make_server):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = make_server(port=holder.getsockname()[1])
        done = subprocess.run([str(BIN / "tellodb"), "serve"], env=server.env, capture_output=True, text=True,
                              timeout=120, cwd=str(server.data_dir.parent))
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{server.port}" in done.stderr, done.stderr
    assert "Cluster ready" not in done.stderr and "Traceback" not in done.stderr, done.stderr
