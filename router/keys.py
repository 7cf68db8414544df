"""API keys with a name, a role and the entity-id prefixes they may touch, kept as hashes in a file.

The keys file (`keys_file` in cluster.yaml; default `<data_dir>/keys.yaml`, router.datadir.keys_path) is YAML: `keys: [{name, sha256, role, prefixes, rate,
burst}]`. A key is 32 random bytes shown once by `tellodb keys add`; only its SHA-256 is stored
(a random token of that length needs no slow password hash, and a hash lookup stays O(1)).
Roles nest: `read` (queries, inspect, graph, analytics, export, profile), `write` (also ingest,
delete, erase within its prefixes) and `admin` (also /stats and /admin/*, every entity). A key
with no prefixes reaches every entity. The single configured key (`api_key`) stays an admin key
named `default` with every prefix, so deployments without a keys file work as before.

The router reloads the file when its modification time changes (checked at most once a second) or
on SIGHUP, so `tellodb keys revoke` takes effect on a running engine without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from router import tuning

ROLES = ("read", "write", "admin")
PREFIX = "tdb_"  # keys are recognisable in logs and secret scanners


class KeysError(ValueError):
    """The keys file or a key change is invalid; the message says why."""


@dataclass(frozen=True)
class Key:
    name: str
    role: str
    prefixes: tuple[str, ...] = ()  # () = every entity
    rate: float | None = None  # requests per second (None: the router's default)
    burst: int | None = None

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def covers(self, entity_id: str) -> bool:
        return not self.prefixes or any(entity_id.startswith(p) for p in self.prefixes)


def digest(key: str | bytes) -> str:
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def read_file(path: str | Path) -> dict[str, tuple[Key, str]]:
    """name -> (Key, sha256 hex) from the keys file; a missing file has no keys."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return {}
    except yaml.YAMLError as exc:
        raise KeysError(f"{path}: not valid YAML: {exc}") from None
    entries = loaded.get("keys") if isinstance(loaded, dict) else None
    if not isinstance(entries, list):
        raise KeysError(f"{path}: expected `keys:` with a list of keys")
    keys: dict[str, tuple[Key, str]] = {}
    for i, e in enumerate(entries):
        try:
            key = Key(str(e["name"]), str(e["role"]), tuple(str(p) for p in e.get("prefixes") or ()),
                      None if e.get("rate") is None else float(e["rate"]),
                      None if e.get("burst") is None else int(e["burst"]))
            sha = str(e["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KeysError(f"{path}: key {i}: {exc!r} (each key needs name, sha256 and role)") from None
        _check(key, path)
        if len(sha) != 64 or key.name in keys:
            raise KeysError(f"{path}: key {key.name!r}: a bad sha256 or a repeated name")
        keys[key.name] = (key, sha)
    return keys


def _check(key: Key, where: object) -> None:
    if key.role not in ROLES:
        raise KeysError(f"{where}: key {key.name!r}: role must be one of {', '.join(ROLES)}, not {key.role!r}")
    if not key.name or key.name == "default" or not key.name.replace("-", "").replace("_", "").isalnum():
        raise KeysError(f"{where}: key name {key.name!r}: letters, digits, - and _ only ('default' is the "
                        "configured api_key)")
    if (key.rate is not None and key.rate <= 0) or (key.burst is not None and key.burst < 1):
        raise KeysError(f"{where}: key {key.name!r}: rate must be positive and burst at least 1")


def write_file(path: str | Path, keys: dict[str, tuple[Key, str]]) -> None:
    """Replace the keys file atomically, readable by its owner only."""
    entries = [{**{k: v for k, v in asdict(key).items() if v not in (None, ())}, "prefixes": list(key.prefixes),
                "sha256": sha} for key, sha in keys.values()]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump({"keys": entries}, f, sort_keys=False)
    os.replace(tmp, path)


def add(path: str | Path, key: Key) -> str:
    """Add `key` to the file; returns the secret, which is stored nowhere."""
    _check(key, path)
    keys = read_file(path)
    if key.name in keys:
        raise KeysError(f"a key named {key.name!r} exists; revoke it first or choose another name")
    secret = PREFIX + secrets.token_urlsafe(32)
    keys[key.name] = (key, digest(secret))
    write_file(path, keys)
    return secret


def revoke(path: str | Path, name: str) -> None:
    keys = read_file(path)
    if name not in keys:
        raise KeysError(f"no key named {name!r} in {path}")
    del keys[name]
    write_file(path, keys)


class KeyRing:
    """Who a request's key belongs to: the configured key, or one of the keys file's (reloaded on change)."""

    def __init__(self, master: str, path: str | None = None) -> None:
        self.master = Key("default", "admin")
        self._master_sha = digest(master)
        self.path = path
        self._by_sha: dict[str, Key] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self.reload()

    def reload(self) -> None:
        """Read the keys file again; a broken file keeps the keys loaded before (and raises)."""
        if self.path is None:
            return
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            mtime = None
        keys = read_file(self.path)
        self._by_sha = {sha: key for key, sha in keys.values()}
        self._mtime = mtime

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < tuning.KEYS_CHECK_S:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self.reload()

    def identify(self, offered: list[str]) -> Key | None:
        """The key among `offered` (header values), or None."""
        for candidate in offered:
            sha = digest(candidate)
            if hmac.compare_digest(sha, self._master_sha):
                return self.master
            key = self._by_sha.get(sha)
            if key is not None:
                return key
        return None
