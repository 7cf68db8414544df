"""Sentence embeddings, and a batcher that embeds concurrent requests together.

The model is the engine's main cost: one forward pass over 32 texts costs far less than 32 passes.
`BatchingEmbedder` runs the model on its own thread (the node's event loop never blocks) and gives
each pass everything that queued up while the previous one ran, up to `max_batch` texts and
`max_chars` characters: no added latency when idle, large batches under load, and a large request
embedded over several passes so other requests' texts ride along instead of waiting for all of it.
`max_wait_ms > 0` additionally waits that long for company before a pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from node.config import ConfigError
from node.lru import LRU
from node.tuning import SMALL_JOB

log = logging.getLogger("tellodb.embedder")


class TorchMissing(ConfigError):
    """`embedding.backend: torch` on an install without the `torch` extra."""

    def __init__(self, module: str) -> None:
        super().__init__(f"embedding.backend: torch needs {module}, which is not installed: "
                         "pip install 'tellodb-cluster[torch]', or use an ONNX backend, such as the default onnx-w8 (docs/guide/install.md#lean-install-no-torch)")


class Embedder:
    """A local sentence-transformers model that returns L2-normalised float32 vectors."""

    def __init__(self, model_path: str, device: str = "cpu", threads: int = 1) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise TorchMissing(exc.name or "torch") from None

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
    """The embedder for a normalised backend name: `torch`, `onnx`, `onnx-w8` or `onnx-int8`. `model_path`
    is a sentence-transformers folder or an ONNX export folder (node.config.resolve_model_path).
    Raises a ConfigError naming the fix when this install lacks what the backend needs."""
    if backend == "torch":
        return Embedder(model_path, device, threads)
    from node.onnx_embedder import OnnxEmbedder, export_onnx

    return OnnxEmbedder(model_path, export_onnx(model_path, data_dir, backend), threads, device)


def check_embedder(model: str, backend: str, data_dir: str) -> str:
    """What `load_embedder` will need, checked without loading anything (so `tellodb serve` can
    refuse to start with one clear message before Ray does): the model folder, and for `torch`
    torch itself, for the ONNX backends the export in `<data_dir>/models/` or the tools to make it."""
    import importlib.util

    from node.config import resolve_model_path

    model_path = resolve_model_path(model, data_dir)
    if backend == "torch":
        for module in ("torch", "sentence_transformers"):
            if importlib.util.find_spec(module) is None:
                raise TorchMissing(module)
        return model_path
    from node.onnx_embedder import export_target

    export_target(model_path, data_dir, backend)
    return model_path




class EmbeddingCache:
    """The vectors of recently embedded query texts, least recently used out first (the upstream
    engine keeps one too): an agent asks the same questions again, and a warm query then skips the
    model. Keyed by model and text, so a node that changes model never answers from the old one."""

    def __init__(self, model: str, max_entries: int) -> None:
        self.model = model
        self.max_entries = max_entries
        self._lru: LRU[tuple[str, str], np.ndarray] = LRU(max_entries)
        self._vectors = self._lru.entries  # (model, text) -> vector, least recently used first

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, text: str) -> np.ndarray | None:
        return self._lru.get((self.model, text))

    def put(self, text: str, vector: np.ndarray) -> None:
        if self.max_entries <= 0:
            return
        vector = vector.copy()
        vector.flags.writeable = False  # shared by every caller that hits it
        self._lru.put((self.model, text), vector)

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self)}


class _Job:
    """One `embed` call: its texts, how many are done, and the vectors so far."""

    __slots__ = ("texts", "future", "done", "parts")

    def __init__(self, texts: list[str], future: asyncio.Future) -> None:
        self.texts = texts
        self.future = future
        self.done = 0
        self.parts: list[np.ndarray] = []

    @property
    def remaining(self) -> int:
        return len(self.texts) - self.done


class BatchingEmbedder:
    """Coalesces concurrent `embed` calls into shared model passes, and cuts large calls into
    passes of at most `max_batch` texts and `max_chars` characters (at least one text), so a query
    that arrives while a large batch embeds waits for one pass, not for the whole batch: each pass
    takes one text of the oldest call (it always progresses), then the calls with the fewest
    texts left first."""

    def __init__(self, embedder: Embedder, max_batch: int = 64, max_wait_ms: float = 0.0,
                 max_chars: int = 4096, cache_entries: int = 0) -> None:
        self.embedder = embedder
        self.cache = EmbeddingCache(str(getattr(embedder, "model_path", "")), cache_entries)
        self.max_batch = max_batch
        self.max_chars = max_chars
        self.max_wait = max_wait_ms / 1000.0
        self._waiting: list[_Job] = []  # in arrival order
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.passes = 0  # model calls made, for tests and stats
        self.busy_seconds = 0.0  # time the model ran
        self.longest_pass_seconds = 0.0  # the longest single model call: how long a query can wait for the thread

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    async def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future: asyncio.Future = loop.create_future()
        self._waiting.append(_Job(list(texts), future))
        self._arrived.set()
        return await future

    async def embed_query(self, text: str) -> np.ndarray:
        """One query text's vector, from the cache when it was embedded lately (`EmbeddingCache`)."""
        vector = self.cache.get(text)
        if vector is None:
            vector = (await self.embed([text]))[0]
            self.cache.put(text, vector)
        return vector

    def _plan(self) -> list[tuple[_Job, int]]:
        """The next pass: (job, how many of its next texts), within max_batch texts and max_chars.

        One text of the oldest job first (it always progresses); then every small job (a query,
        a single ingest: at most SMALL_JOB texts) that fits whole, in arrival order. A pass that
        holds no other job is then filled up in arrival order, so large jobs finish one after
        another and none starves; a small job's pass carries at most one text of a large job
        besides it, so queries are not held behind bulk imports."""
        self._waiting = [job for job in self._waiting if not job.future.done()]  # cancelled callers drop out
        if not self._waiting:
            return []
        counts: dict[int, int] = {}
        jobs = {id(job): job for job in self._waiting}
        used = [0, 0]  # texts, characters

        def take(job: _Job, limit: int) -> None:
            while counts.get(id(job), 0) < limit and used[0] < self.max_batch:
                text = job.texts[job.done + counts.get(id(job), 0)]
                n = len(text) if isinstance(text, str) else 1
                if used[0] and used[1] + n > self.max_chars:
                    return
                counts[id(job)] = counts.get(id(job), 0) + 1
                used[0], used[1] = used[0] + 1, used[1] + n

        oldest = self._waiting[0]
        take(oldest, 1)
        for job in self._waiting:
            rest = job.texts[job.done + counts.get(id(job), 0):]
            if job.remaining <= SMALL_JOB and used[0] + len(rest) <= self.max_batch and \
                    used[1] + sum(len(t) if isinstance(t, str) else 1 for t in rest) <= self.max_chars:
                take(job, job.remaining)
        if len(counts) == 1:
            for job in self._waiting:
                take(job, job.remaining)
        return [(jobs[key], n) for key, n in counts.items()]

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while sum(job.remaining for job in self._waiting) < self.max_batch and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            plan = self._plan()
            if not plan:
                continue
            texts = [t for job, n in plan for t in job.texts[job.done:job.done + n]]
            try:
                vectors = await loop.run_in_executor(self._pool, self._timed_encode, texts)
                self.passes += 1
            except Exception as exc:  # one bad pass fails its callers, not the worker
                log.exception("embedding failed for a batch of %d texts", len(texts))
                for job, _ in plan:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            offset = 0
            for job, n in plan:
                job.parts.append(vectors[offset:offset + n])
                job.done += n
                offset += n
                if job.remaining == 0 and not job.future.done():
                    job.future.set_result(job.parts[0] if len(job.parts) == 1 else np.concatenate(job.parts))
            self._waiting = [job for job in self._waiting if job.remaining and not job.future.done()]

    def _timed_encode(self, texts: list[str]) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.embedder.encode(texts)
        finally:
            took = time.perf_counter() - started
            self.busy_seconds += took
            self.longest_pass_seconds = max(self.longest_pass_seconds, took)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
