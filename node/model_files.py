"""Where an ONNX export of a model lives in a data directory, read from its files alone.

Both the configuration (node.config.resolve_model_path: a lean install finds the default model's
export here) and the ONNX path (node.onnx_embedder, which writes exports) need this; it imports
neither, so they do not import each other.
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE = "source.json"  # in an export folder: which model it was exported from


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / SOURCE).is_file()


def find_export(model: str, data_dir: str) -> Path | None:
    """The export folder of `model` (its name as configured) in `<data_dir>/models/`, read from
    each folder's `source.json`; the newest if there are several. For installs without the model
    package, whose path the cache key needs."""
    found = []
    for source in (Path(data_dir) / "models").glob(f"*/{SOURCE}"):
        try:
            if json.loads(source.read_text(encoding="utf-8")).get("model") == model:
                found.append(source.parent)
        except (OSError, ValueError):
            continue
    return max(found, key=lambda p: ((p / "model.onnx").exists(), (p / SOURCE).stat().st_mtime), default=None)
