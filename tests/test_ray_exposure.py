"""On one machine nothing the engine starts listens beyond loopback, and its Ray wants a token.

The processes are found through /proc (the server's session, which `make_server` starts it in,
plus its descendants), their listening sockets by mapping socket inodes from /proc/PID/fd to
/proc/net/tcp and tcp6.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

LISTEN = "0A"


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3])


def process_tree(root: int) -> set[int]:
    """The processes of `root`'s session and every descendant of `root`."""
    parents: dict[int, int] = {}
    found = {root}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            parents[int(entry)] = st[0]
            if st[1] == root:
                found.add(int(entry))
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # /proc/net/tcp* print the address as 32-bit words in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket in this network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != LISTEN:
                continue
            addr, port = parts[1].split(":")
            found[int(parts[9])] = (str(_address(addr)), int(port, 16))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def listeners_of(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of each listening socket the processes hold."""
    sockets = listening_sockets()
    out = []
    for pid in sorted(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and (inode := int(target[8:-1])) in sockets:
                out.append((pid, name, *sockets[inode]))
    return out


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_loopback_helpers():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.0.2.2")
    assert _address("0100007F") == ipaddress.ip_address("127.0.0.1")
    assert _address("0000000000000000FFFF00000100007F") == ipaddress.ip_address("::ffff:127.0.0.1")


def test_single_machine_engine_listens_on_loopback_only(make_server):
    server = make_server().start()
    tree = process_tree(server.proc.pid)
    found = listeners_of(tree)
    names = {name for _, name, _, _ in found}
    # The check must see Ray's servers, not just the router's socket.
    assert {"gcs_server", "raylet"} <= names, found
    assert (server.proc.pid, "127.0.0.1", server.port) in {(p, a, port) for p, _, a, port in found}
    exposed = [s for s in found if not is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_local_ray_requires_the_engines_token(make_server, tmp_path):
    server = make_server().start()
    tree = process_tree(server.proc.pid)
    gcs = [(pid, port) for pid, name, _, port in listeners_of(tree) if name == "gcs_server"]
    assert gcs
    gcs_pid, gcs_port = gcs[0]
    env = environ_of(gcs_pid)
    assert env.get("RAY_AUTH_MODE") == "token"
    token_path = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token_path.parent == server.data_dir
    assert token_path.stat().st_mode & 0o777 == 0o600
    token = token_path.read_text().strip()
    assert len(token) >= 32
    assert token not in server.log_text()

    # A driver without the token (empty HOME: not even ~/.ray/auth_token) is turned away; the same
    # driver given the engine's token connects. Ray's single-machine mode keeps 127.0.0.1 as given.
    home = tmp_path / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    clean.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    probe = ("import ray, sys\n"
             "try:\n"
             f"    ray.init(address='127.0.0.1:{gcs_port}', logging_level='ERROR')\n"
             "except Exception as exc:\n"
             "    print(type(exc).__name__, exc); sys.exit(3)\n"
             "print('connected'); ray.shutdown()\n")

    def connect(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True,
                              timeout=120)

    refused = connect()
    assert refused.returncode == 3 and "InvalidAuthToken" in refused.stderr, refused.stdout + refused.stderr
    admitted = connect(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    assert admitted.returncode == 0 and "connected" in admitted.stdout, admitted.stdout + admitted.stderr
