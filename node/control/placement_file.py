"""A placement on disk: the authority's record (`<head data_dir>/placement.json`) and each node's
copy of the last one it saw (`<node data_dir>/last_placement.json`), from which a head that lost
its disk rebuilds the cluster's placement (node.control.authority, the highest epoch wins)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from node.control.placement import Placement

log = logging.getLogger("tellodb")
NODE_COPY = "last_placement.json"


def save(path: str | Path, placement: Placement) -> None:
    write_json(path, placement.to_json())


def write_json(path: str | Path, data: Any) -> None:
    """Write atomically (a crash leaves the old file or the new one), under a unique temporary
    name so two writers never share one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> Placement | None:
    """The placement in `path`, or None when there is none (or it cannot be read: said in the log)."""
    path = Path(path)
    try:
        return Placement.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("placement file %s not read: %s", path, exc)
        return None


def node_copy(data_dir: str | Path) -> Path:
    return Path(data_dir) / NODE_COPY
