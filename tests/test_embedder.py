"""The batching embedder: concurrent requests share model passes and each gets its own vectors."""

import asyncio

import numpy as np

from node.embedder import BatchingEmbedder, EmbeddingCache


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


async def test_a_large_call_is_cut_into_passes_and_a_small_one_rides_the_next(embedder):
    batcher = BatchingEmbedder(embedder, max_batch=4, max_chars=8192)
    texts = [f"long text number {i} " * 12 for i in range(40)]  # ten passes of four
    try:
        big = asyncio.ensure_future(batcher.embed(texts))
        while batcher.passes < 1:
            await asyncio.sleep(0.002)
        before = batcher.passes
        small = await batcher.embed(["a short query"])
        assert not big.done() and batcher.passes - before <= 2  # it waited for at most the pass under way
        np.testing.assert_allclose(small, embedder.encode(["a short query"]), atol=1e-5)
        np.testing.assert_allclose(await big, embedder.encode(texts), atol=1e-5)  # in order, all of them
    finally:
        await batcher.close()


async def test_passes_are_bounded_by_characters_and_cancelled_calls_drop_out(embedder):
    batcher = BatchingEmbedder(embedder, max_batch=64, max_chars=1000)
    try:
        await batcher.embed(["x" * 400] * 6)
        assert batcher.passes == 3  # two 400-character texts per pass
        await batcher.embed(["y" * 5000])  # one text over the bound still gets its own pass
        assert batcher.passes == 4
        big = asyncio.ensure_future(batcher.embed(["z" * 900] * 50))
        while batcher.passes < 5:
            await asyncio.sleep(0.002)
        big.cancel()
        assert (await batcher.embed(["after"])).shape == (1, embedder.dimension)
        assert batcher.passes < 10  # the cancelled call stopped taking passes
    finally:
        await batcher.close()


async def test_no_bulk_call_starves_while_others_keep_coming(embedder):
    """Four clients each send bulk calls (a node's share of an /ingest/batch) one after another.
    First come, first served: a call waits for at most the calls ahead of it, counted in model
    passes. The planner used to give the oldest call one text per pass while younger calls that fit
    whole went first, so under load the oldest crawled (bulk-import p99 8-11 s, median 0.5 s)."""
    batcher = BatchingEmbedder(embedder, max_batch=64, max_chars=4096)
    waits: list[int] = []

    async def client(c: int) -> None:
        for k in range(8):
            before = batcher.passes
            await batcher.embed([f"client {c} call {k} note {i}: the garden" for i in range(24)])
            waits.append(batcher.passes - before)

    await asyncio.gather(*(client(c) for c in range(4)))
    # Four calls of 24 texts are 96 texts: two passes hold them all, so no call should need more than
    # a few; a call that gets one text per pass needs about 24.
    assert max(waits) <= 6, sorted(waits)
    await batcher.close()


async def test_a_repeated_query_text_skips_the_model_and_the_oldest_leaves_first(embedder):
    b = BatchingEmbedder(embedder, cache_entries=2)
    first = await b.embed_query("where do I live?")
    assert b.passes == 1 and np.allclose(first, (await b.embed(["where do I live?"]))[0])
    again = await b.embed_query("where do I live?")
    assert b.passes == 2 and np.array_equal(first, again)  # the second pass was embed(), not embed_query()
    await b.embed_query("what do I eat?")
    await b.embed_query("where do I live?")  # now the most recent
    await b.embed_query("who are my friends?")  # evicts "what do I eat?"
    assert b.cache.stats() == {"hits": 2, "misses": 3, "entries": 2}
    await b.embed_query("what do I eat?")
    assert b.cache.stats()["misses"] == 4 and b.passes == 5
    with np.testing.assert_raises(ValueError):
        again[0] = 1.0  # a cached vector is shared: nobody may change it
    await b.close()


def test_the_cache_is_keyed_by_model_and_can_be_off():
    vector = np.ones(3, dtype=np.float32)
    a, b, off = EmbeddingCache("model-a", 8), EmbeddingCache("model-b", 8), EmbeddingCache("model-a", 0)
    a.put("hi", vector)
    off.put("hi", vector)
    assert a.get("hi") is not None and off.get("hi") is None and len(off) == 0
    b._vectors.update(a._vectors)  # the same text's entry, made with another model, is not model-b's
    assert b.get("hi") is None
