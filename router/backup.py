"""`tellodb backup` and `tellodb restore`: a running engine's shards to a folder, and back into a data directory.

A backup is a folder: `shards/NNNN/store.sqlite3` for every shard (each a consistent snapshot taken
while the engine serves, `POST /admin/shards/{n}/snapshot`) and `manifest.json`, written last: engine
version, shard count, model and dimension, and per file its shard, sequence number, size and sha256.
A folder without a manifest is an unfinished backup. Vector indexes are not in it: the restored
engine builds them from the stored vectors at its first start, without re-embedding.

`restore` checks every file against the manifest before it writes anything, then lays out a data
directory that `tellodb serve --data-dir DIR` starts on (with the same shard count and model).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from node.control import placement_file
from node.control.placement import Placement
from node.store import file_sha256
from router import __version__, datadir, tuning
from router.client import ClientError, Progress, get_json, request

MANIFEST = "manifest.json"
FORMAT = 1


class BackupError(ClientError):
    """The backup or restore cannot go on; the message says why."""


def shard_file(shard: int) -> str:
    return f"shards/{shard:04d}/store.sqlite3"


def _empty_or_absent(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def backup(dest: str, url: str, key: str, force: bool = False,
           progress: Callable[[str, int], Progress] = Progress) -> dict:
    """Back up every shard of the engine at `url` into the folder `dest`; returns the manifest."""
    out = Path(dest)
    if not _empty_or_absent(out) and not force:
        raise BackupError(f"{out} is not empty: back up into a new folder (or pass --force to overwrite)")
    url = url.rstrip("/")
    cluster = get_json(f"{url}/admin/shards", key)
    shards = int(cluster["shards"])
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    files: dict[str, dict] = {}
    total = 0
    bar = progress("backup", shards)
    bar.update(0, 0)
    for shard in range(shards):
        target = out / shard_file(shard)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with request(f"{url}/admin/shards/{shard}/snapshot", key, "POST") as r, open(f"{target}.part", "wb") as f:
            expected, seq = r.headers["X-Tellodb-Sha256"], int(r.headers["X-Tellodb-Seq"])
            while block := r.read(tuning.BACKUP_BLOCK_BYTES):
                f.write(block)
                digest.update(block)
                total += len(block)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != expected:
            raise BackupError(f"shard {shard}: the copy received does not match its sha256; run the backup again")
        os.replace(f"{target}.part", target)
        files[shard_file(shard)] = {"shard": shard, "seq": seq, "bytes": target.stat().st_size, "sha256": expected}
        bar.update(shard + 1, total)
    manifest = {"format": FORMAT, "engine_version": cluster["engine_version"], "backup_tool_version": __version__,
                "created_at_ms": int(time.time() * 1000), "shards": shards, "model": cluster["model"],
                "dimension": cluster["dimension"], "files": files}
    if cluster.get("created_shards", shards) != shards:  # split: the hash range of each shard
        manifest.update(created_shards=cluster["created_shards"], ranges=cluster["ranges"])
    with open(out / f"{MANIFEST}.part", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(out / f"{MANIFEST}.part", out / MANIFEST)
    return manifest


def verify(src: str) -> dict:
    """The backup's manifest, once every shard's file is present and matches its size and sha256."""
    root = Path(src)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"{root} has no {MANIFEST}: not a backup, or an unfinished one") from None
    except ValueError as exc:
        raise BackupError(f"{root / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{root / MANIFEST}: unknown backup format {manifest.get('format')!r}")
    files = manifest["files"]
    for shard in range(manifest["shards"]):
        name = shard_file(shard)
        if name not in files or not (root / name).is_file():
            raise BackupError(f"shard {shard} is missing from the backup ({root / name})")
        entry = files[name]
        if (root / name).stat().st_size != entry["bytes"] or file_sha256(root / name) != entry["sha256"]:
            raise BackupError(f"shard {shard}: {root / name} does not match its sha256 in the manifest (corrupt)")
    return manifest


def restore(src: str, data_dir: str, force: bool = False,
            progress: Callable[[str, int], Progress] = Progress) -> dict:
    """Verify the backup in `src`, then lay it out as the data directory `data_dir`."""
    manifest = verify(src)
    target = Path(data_dir)
    if not _empty_or_absent(target) and not force:
        raise BackupError(f"{target} is not empty: restore into a new data directory (or pass --force to "
                          "replace the shards it holds)")
    datadir.make_private(str(target))
    try:
        held = datadir.lock(str(target), "restore", 0)  # no engine may run on it meanwhile
    except datadir.DataDirBusy as exc:
        raise BackupError(str(exc)) from None
    try:
        shutil.rmtree(target / "shards", ignore_errors=True)
        bar = progress("restore", manifest["shards"])
        total = 0
        for shard in range(manifest["shards"]):
            name = shard_file(shard)
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(src) / name, target / name)
            total += manifest["files"][name]["bytes"]
            bar.update(shard + 1, total)
        created = manifest.get("created_shards", manifest["shards"])
        datadir.write_identity(str(target), datadir.identity(created, manifest["model"], manifest["dimension"]))
        if "ranges" in manifest:  # a split cluster's: its shards' hash ranges, kept by `tellodb serve` (any nodes)
            placement_file.save(target / "placement.json", Placement(
                manifest["shards"], ("restored",), ranges=tuple(map(tuple, manifest["ranges"])), created_shards=created))
    finally:
        datadir.unlock(held)
    return manifest
