"""The router's own embedding of the queries every node answers, when the model is already here.

A query without an entity is answered by every node, so it is embedded once for all of them. Asking
a node to embed it costs a Ray round trip to that node and back before any node can start (about
2.4 ms of a global query's p50 on two cores: docs/benchmarks.md). So the router embeds such a query
itself when its data directory already holds the model's ONNX export for the configured backend:
under `tellodb serve` the nodes made it there, and its weights are a mapped file whose pages the
router shares with them. Where there is none (a router pod of the Helm chart has no model), with the
torch backend, and while the model loads, `Cluster.embed_once` asks a node, as before.

The router never exports a model: it loads an export at the first query that needs it, on a
thread (the event loop goes on serving; that query is embedded by a node), so it starts as light as
before. An export not there yet (the nodes make it as they first start) is looked for again after
RETRY_S. Vectors are the nodes' own: the same file, the same code (node.onnx_embedder), one thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from node.config import ClusterConfig, ConfigError, normalized_backend, resolve_model_path
from node.embedder import BatchingEmbedder

log = logging.getLogger("tellodb")

RETRY_S = 30.0  # a router without the export looks for it again after this long


class QueryEmbedder:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.embedder: BatchingEmbedder | None = None
        self.missing = "not looked for yet"  # why the router does not embed (stats); None once it does
        self._loading: asyncio.Future | None = None
        self._next_look = 0.0

    async def embed(self, text: str) -> np.ndarray | None:
        """`text`'s vector, or None when this router has no model (yet): the caller asks a node."""
        if self.embedder is not None:
            return await self.embedder.embed_query(text)
        if self._loading is None and time.monotonic() >= self._next_look:
            self._loading = asyncio.get_running_loop().run_in_executor(None, self._load)
            self._loading.add_done_callback(self._loaded)
        return None

    def _load(self) -> Any:
        """The export's embedder (node.onnx_embedder.OnnxEmbedder), or why there is none (a str)."""
        backend = normalized_backend(self.config)
        if backend == "torch":
            return "the torch backend: nodes embed"
        from node.onnx_embedder import OnnxEmbedder, export_target
        from node.model_files import is_export

        try:
            model_path = resolve_model_path(self.config.embedding.model, self.config.data_dir)
            target = export_target(model_path, self.config.data_dir, backend)
        except ConfigError as exc:
            return f"no export of the model here ({exc})"
        if not (target.exists() and is_export(target.parent)):
            return f"no export of the model in {target.parent}"
        return OnnxEmbedder(model_path, target, threads=1, device="cpu")

    def _loaded(self, loading: asyncio.Future) -> None:
        self._loading = None
        try:
            found = loading.result()
        except Exception as exc:  # a broken export: the nodes still embed
            found = f"loading the export failed: {exc!r}"
        if isinstance(found, str):
            self.missing = found
            (log.info if self._next_look == 0.0 else log.debug)(  # said once, not every RETRY_S
                "The router asks a node to embed queries that span nodes: %s", found)
            self._next_look = time.monotonic() + RETRY_S
            return
        self.embedder = BatchingEmbedder(found, max_batch=self.config.embedding.batch_size,
                                         max_chars=self.config.embedding.batch_chars,
                                         cache_entries=self.config.embedding.cache_entries)
        self.missing = None
        log.info("The router embeds queries that span nodes itself path=%s", found.onnx_path)

    def stats(self) -> dict[str, Any]:
        """Whether the router embeds (else why not), its model passes and cache counts."""
        if self.embedder is None:
            return {"embeds": False, "why_not": self.missing, "embedder_passes": 0,
                    "embedding_cache": {"hits": 0, "misses": 0, "entries": 0}}
        return {"embeds": True, "embedder_passes": self.embedder.passes, "embedding_cache": self.embedder.cache.stats()}

    async def close(self) -> None:
        if self.embedder is not None:
            await self.embedder.close()
