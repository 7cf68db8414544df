"""The batching embedder: concurrent requests share model passes and each gets its own vectors."""

import asyncio

import numpy as np

from node.embedder import BatchingEmbedder


async def test_concurrent_requests_are_batched_in_order(embedder):
    batcher = BatchingEmbedder(embedder, max_batch=64, max_wait_ms=20)
    texts = [[f"request {i} text {j}" for j in range(i % 3 + 1)] for i in range(24)]
    try:
        results = await asyncio.gather(*(batcher.embed(t) for t in texts))
    finally:
        await batcher.close()
    assert batcher.passes < len(texts)  # shared passes, not one per request
    for t, got in zip(texts, results):
        assert got.shape == (len(t), embedder.dimension)
        np.testing.assert_allclose(got, embedder.encode(t), atol=1e-5)


async def test_batches_are_bounded(embedder):
    batcher = BatchingEmbedder(embedder, max_batch=4, max_wait_ms=50)
    try:
        await asyncio.gather(*(batcher.embed([f"t{i}"]) for i in range(12)))
    finally:
        await batcher.close()
    assert batcher.passes >= 3


async def test_vectors_are_normalised(embedder):
    v = embedder.encode(["hello world", "another sentence"])
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


async def test_a_failing_batch_fails_its_callers_and_the_batcher_survives(embedder):
    batcher = BatchingEmbedder(embedder, max_batch=8, max_wait_ms=1)
    try:
        try:
            await batcher.embed([None])  # not a string: the tokenizer raises
            raised = False
        except Exception:
            raised = True
        assert raised
        assert (await batcher.embed(["still works"])).shape == (1, embedder.dimension)
    finally:
        await batcher.close()
