"""The data directory: private to the engine's user, and held by one engine at a time.

Like PostgreSQL's: folders 0700, files 0600. The process umask is 077 from the start of `tellodb
serve`, so everything this process and the Ray processes it starts (they inherit the umask)
create is private; a data directory left looser by an older version is tightened once at start.

One engine per data directory: `tellodb.lock` is held with `fcntl.flock` for the life of the
process. The kernel drops the lock when the process ends, however it ends (kill -9 included), so a
crashed engine never blocks a restart. The file names the holder for the next one's message.

What the data was written with: `engine.json` records the shard count and the embedding model's
name and dimension at the first start. Another shard count would re-hash every entity onto other
shards, and another dimension cannot search the stored vectors, so a start that differs is refused
before any start-up work, with a message saying what differs and what to do.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat

log = logging.getLogger("tellodb")
LOCK_NAME = "tellodb.lock"
IDENTITY_NAME = "engine.json"
KEYS_NAME = "keys.yaml"  # the scoped API keys when keys_file is not set (router.keys)
AUDIT_NAME = "audit.log"
_held: list[int] = []  # open lock descriptors, kept for the life of the process


class DataDirBusy(Exception):
    """Another live engine holds the data directory."""


class DataDirMismatch(Exception):
    """The configuration differs from what the data directory was written with."""


def keys_path(keys_file: str | None, data_dir: str) -> str:
    """The keys file: `keys_file` as given, else <data_dir>/keys.yaml, so `tellodb keys` and the
    engine agree without configuration."""
    return keys_file or os.path.join(data_dir, KEYS_NAME)


def audit_path(audit_file: str | None, data_dir: str, name: str = AUDIT_NAME) -> str:
    """The audit file: `audit_file` if absolute, else under the data directory (a relative one
    too), never in whatever folder the command was started from."""
    return os.path.join(data_dir, audit_file or name)


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


def lock(data_dir: str, host: str, port: int) -> int:
    """Hold the data directory for this process, or raise DataDirBusy naming the holder; returns
    the lock's descriptor (for `unlock`)."""
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
    return fd


def unlock(fd: int) -> None:
    """Let the data directory go before this process ends (the restore command does)."""
    _held.remove(fd)
    os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:  # the holder is between taking the lock and writing its name
        return {}


def identity(shards: int, model: str, dimension: int) -> dict:
    return {"shards": shards, "model": model, "dimension": dimension}


def check_identity(data_dir: str, wanted: dict) -> None:
    """Record `wanted` (see `identity`) at the first start; on later starts refuse a different shard
    count or dimension (DataDirMismatch), and warn about a different model name of the same size."""
    path = os.path.join(data_dir, IDENTITY_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except FileNotFoundError:
        recorded = _infer_identity(data_dir, wanted)
        write_identity(data_dir, recorded)
    if recorded["shards"] != wanted["shards"]:
        raise DataDirMismatch(
            f"data directory {os.path.abspath(data_dir)} holds {recorded['shards']} shards but shards is set to "
            f"{wanted['shards']}: every entity would hash to another shard and its memories would be unreachable. "
            f"Set shards: {recorded['shards']} (TELLODB_SHARDS), or use a new data directory")
    if recorded["dimension"] != wanted["dimension"]:
        raise DataDirMismatch(
            f"data directory {os.path.abspath(data_dir)} holds {recorded['dimension']}-dimensional vectors of "
            f"{recorded['model']!r} but the configured model {wanted['model']!r} makes {wanted['dimension']}: "
            f"configure the model the data was written with, or use a new data directory")
    if recorded["model"] != wanted["model"]:
        log.warning("The data was written with model %r and the configured model is %r (same dimension %d): "
                    "similarities are only meaningful if they are the same model", recorded["model"], wanted["model"],
                    wanted["dimension"])


def write_identity(data_dir: str, recorded: dict) -> None:
    path = os.path.join(data_dir, IDENTITY_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(recorded, f, indent=2)
    os.replace(path + ".tmp", path)


def _infer_identity(data_dir: str, wanted: dict) -> dict:
    """For a data directory from before engine.json: what its shard folders allow us to say."""
    shards_dir = os.path.join(data_dir, "shards")
    existing = [int(n) for n in os.listdir(shards_dir) if n.isdigit()] if os.path.isdir(shards_dir) else []
    if existing and max(existing) >= wanted["shards"]:
        raise DataDirMismatch(
            f"data directory {os.path.abspath(data_dir)} has shard {max(existing)}, so it was written with more than "
            f"the {wanted['shards']} shards configured: set shards to the count it was written with")
    return dict(wanted)
