"""The data directory: private to the engine's user, and held by one engine at a time.

Like PostgreSQL's: folders 0700, files 0600. The process umask is 077 from the start of `tellodb
serve`, so everything this process and the Ray processes it starts (they inherit the umask)
create is private; a data directory left looser by an older version is tightened once at start.

One engine per data directory: `tellodb.lock` is held with `fcntl.flock` for the life of the
process. The kernel drops the lock when the process ends, however it ends (kill -9 included), so a
crashed engine never blocks a restart. The file names the holder for the next one's message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat

log = logging.getLogger("tellodb")
LOCK_NAME = "tellodb.lock"
_held: list[int] = []  # open lock descriptors, kept for the life of the process


class DataDirBusy(Exception):
    """Another live engine holds the data directory."""


def make_private(data_dir: str) -> None:
    """Set umask 077 and create the data directory 0700 (only the directory: see `tighten`)."""
    os.umask(0o077)
    os.makedirs(data_dir, mode=0o700, exist_ok=True)


def tighten(data_dir: str) -> int:
    """Drop group and other bits of the data directory and everything in it; returns how many changed."""
    changed = _tighten_one(data_dir)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            changed += _tighten_one(os.path.join(root, name))
    return changed


def _tighten_one(path: str) -> int:
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
            return 0
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
        return 1
    except OSError as exc:  # not ours, or gone meanwhile: say so, keep going
        log.warning("Cannot make private path=%s error=%s", path, exc.strerror)
        return 0


def lock(data_dir: str, host: str, port: int) -> None:
    """Hold the data directory for this process, or raise DataDirBusy naming the holder."""
    path = os.path.join(data_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by child processes
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        where = f", listening on {holder['host']}:{holder['port']}" if "host" in holder else ""
        raise DataDirBusy(f"data directory {os.path.abspath(data_dir)} is in use by another tellodb engine "
                          f"(pid {holder.get('pid', 'unknown')}{where}); stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "port": port}).encode(), 0)
    _held.append(fd)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:  # the holder is between taking the lock and writing its name
        return {}
