"""The audit trail: who deleted, erased, exported or administered what, as JSON lines.

One line per event: time (ISO 8601, UTC), key name (never the key), action, entity or memory id,
outcome (the HTTP status). Never memory text. The file (`audit_file`, default
`<data_dir>/audit.log`) is rotated at 10 MiB, five old files kept, and is private (0600).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from datetime import datetime, timezone
from typing import Any
from router.tuning import AUDIT_KEEP, AUDIT_ROTATE_BYTES



class Audit:
    def __init__(self, path: str) -> None:
        self.path = path
        self._log = logging.getLogger(f"tellodb.audit.{id(self)}")
        self._log.propagate = False
        self._log.setLevel(logging.INFO)
        old = os.umask(0o077)
        try:
            handler = logging.handlers.RotatingFileHandler(path, maxBytes=AUDIT_ROTATE_BYTES, backupCount=AUDIT_KEEP,
                                                           encoding="utf-8")
        finally:
            os.umask(old)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._log.addHandler(handler)

    def record(self, key: str, action: str, outcome: int | str, **subject: Any) -> None:
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "key": key, "action": action,
                **{k: v for k, v in subject.items() if v is not None}, "outcome": outcome}
        self._log.info(json.dumps(line, ensure_ascii=False))

    def close(self) -> None:
        for handler in list(self._log.handlers):
            handler.close()
            self._log.removeHandler(handler)
