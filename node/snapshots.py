"""A node's shard snapshots: consistent copies that leave through Ray, a chunk per call (never a
shared filesystem). Copies live in `<data>/snapshots/<node>/` until dropped; a start clears them."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.store import ShardStore


class Snapshots:
    def __init__(self, data_dir: Path, node: str) -> None:
        self.node = node
        self.folder = data_dir / "snapshots" / node
        shutil.rmtree(self.folder, ignore_errors=True)  # copies a crash left behind

    async def take(self, store: ShardStore, shard: int) -> dict[str, Any]:
        """Copy `store` (ShardStore.snapshot) off the store thread (the shard keeps serving); its
        id, sequence number, size and sha256."""
        self.folder.mkdir(parents=True, exist_ok=True)
        snapshot_id = f"{shard:04d}-{os.urandom(8).hex()}"
        info = await asyncio.get_running_loop().run_in_executor(None, store.snapshot, self.folder / snapshot_id)
        return {**info, "id": snapshot_id, "node": self.node}

    def _path(self, snapshot_id: str) -> Path:
        if not snapshot_id.replace("-", "").isalnum():
            raise ValueError(f"bad snapshot id {snapshot_id!r}")
        return self.folder / snapshot_id

    async def read(self, snapshot_id: str, offset: int, size: int) -> bytes:
        def read() -> bytes:
            with open(self._path(snapshot_id), "rb") as f:
                f.seek(offset)
                return f.read(size)

        return await asyncio.get_running_loop().run_in_executor(None, read)

    def drop(self, snapshot_id: str) -> None:
        self._path(snapshot_id).unlink(missing_ok=True)
