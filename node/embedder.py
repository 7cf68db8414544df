"""Sentence embeddings, and a batcher that embeds concurrent requests together.

The model is the engine's main cost: one forward pass over 32 texts costs far less than 32 passes.
`BatchingEmbedder` runs the model on its own thread (the node's event loop never blocks) and gives
each pass everything that queued up while the previous one ran, up to `max_batch` texts: no added
latency when idle, large batches under load. `max_wait_ms > 0` additionally waits that long for
company before a pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("tellodb.embedder")


class Embedder:
    """A local sentence-transformers model that returns L2-normalised float32 vectors."""

    def __init__(self, model_path: str, device: str = "cpu", threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, threads))
        self.threads = max(1, threads)
        self.model_path = model_path
        self.device = device
        self.model = SentenceTransformer(model_path, device=device, local_files_only=True)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dim_fn())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=16,  # sentence-transformers sorts by length; small batches pad little
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def load_embedder(model_path: str, backend: str, device: str, threads: int, data_dir: str):
    """The embedder for a normalised backend name: `torch`, `onnx` or `onnx-int8`."""
    if backend == "torch":
        return Embedder(model_path, device, threads)
    from node.onnx_embedder import OnnxEmbedder, export_onnx

    return OnnxEmbedder(model_path, export_onnx(model_path, data_dir, backend), threads, device)


class BatchingEmbedder:
    """Coalesces concurrent `embed` calls into shared model passes."""

    def __init__(self, embedder: Embedder, max_batch: int = 64, max_wait_ms: float = 0.0) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[list[str], asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.passes = 0  # model calls made, for tests and stats
        self.busy_seconds = 0.0  # time the model ran

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((texts, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            pending = [first]
            size = len(first[0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                pending.append(item)
                size += len(item[0])
            texts = [t for item_texts, _ in pending for t in item_texts]
            try:
                vectors = await loop.run_in_executor(self._pool, self._timed_encode, texts)
                self.passes += 1
            except Exception as exc:  # one bad batch fails its callers, not the worker
                log.exception("embedding failed for a batch of %d texts", len(texts))
                for _, fut in pending:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            offset = 0
            for item_texts, fut in pending:
                n = len(item_texts)
                if not fut.done():
                    fut.set_result(vectors[offset : offset + n])
                offset += n

    def _timed_encode(self, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.embedder.encode(texts)
        finally:
            self.busy_seconds += time.perf_counter() - started

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
