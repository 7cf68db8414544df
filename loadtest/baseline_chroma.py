"""The baseline a team might hand-roll: one process, one Chroma collection, sentence-transformers
(`--backend torch`, issue 22's peer; `python -m loadtest --baseline-backend` picks another, such as
fp32 ONNX Runtime) on every core, no batching, no lexical search. Serves the subset of the Tellodb API the load scenarios use
(/health, /ingest, /ingest/batch, /query/semantic) so `python -m loadtest --baseline` can run the
same scenario against it and the engine, side by side in one run.

    python loadtest/baseline_chroma.py --port 3100 --data /tmp/baseline --key XXX1111AAA
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import numpy as np
from aiohttp import web


def build_app(data_dir: str, key: str, backend: str) -> web.Application:
    import chromadb
    from chromadb.config import Settings

    from node.config import DEFAULT_MODEL, ClusterConfig, EmbeddingConfig, normalized_backend, resolve_model_path
    from node.embedder import load_embedder

    backend = normalized_backend(ClusterConfig(embedding=EmbeddingConfig(backend=backend)))
    embedder = load_embedder(resolve_model_path(DEFAULT_MODEL), backend, "cpu", os.cpu_count() or 1, data_dir)
    client = chromadb.PersistentClient(path=os.path.join(data_dir, "chroma"), settings=Settings(anonymized_telemetry=False))
    collection = client.get_or_create_collection(
        "memories", configuration={"hnsw": {"space": "cosine", "ef_search": 64, "max_neighbors": 16}})
    lock = asyncio.Lock()  # one model, one collection: requests take turns, as a simple service would

    def check(request: web.Request) -> None:
        if request.headers.get("x-api-key") != key:
            raise web.HTTPUnauthorized()

    async def store(items: list[dict]) -> list[str]:
        ids = [it.get("memory_id") or f"{it['entity_id']}::sdk::{uuid.uuid4().hex}" for it in items]
        async with lock:
            vectors = await asyncio.to_thread(embedder.encode, [it["textual_content"] for it in items])
            await asyncio.to_thread(
                collection.upsert, ids=ids, embeddings=vectors, documents=[it["textual_content"] for it in items],
                metadatas=[{"entity_id": it["entity_id"], "created_at_ms": int(it.get("timestamp") or time.time() * 1000)}
                           for it in items])
        return ids

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ingest(request: web.Request) -> web.Response:
        check(request)
        [memory_id] = await store([await request.json()])
        return web.json_response({"status": "ok", "memory_id": memory_id}, status=201)

    async def ingest_batch(request: web.Request) -> web.Response:
        check(request)
        ids = await store((await request.json())["items"])
        return web.json_response({"status": "ok", "ingested": len(ids), "memory_ids": ids}, status=201)

    async def query(request: web.Request) -> web.Response:
        check(request)
        body = await request.json()
        async with lock:
            vector = await asyncio.to_thread(embedder.encode, [body["textual_query"]])
            where = {"entity_id": body["entity_id"]} if body.get("entity_id") else None
            res = await asyncio.to_thread(collection.query, query_embeddings=np.asarray(vector),
                                          n_results=int(body.get("limit", 10)), where=where,
                                          include=["documents", "metadatas", "distances"])
        hits = [{"memory_id": i, "entity_id": m["entity_id"], "created_at_ms": m["created_at_ms"],
                 "similarity": max(0.0, 1.0 - d), "textual_content": doc}
                for i, m, d, doc in zip(res["ids"][0], res["metadatas"][0], res["distances"][0], res["documents"][0])]
        return web.json_response(hits)

    app = web.Application(client_max_size=10 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_post("/ingest", ingest)
    app.router.add_post("/ingest/batch", ingest_batch)
    app.router.add_post("/query/semantic", query)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--key", default="XXX1111AAA")
    ap.add_argument("--backend", default="torch", help="torch (sentence-transformers), onnx, onnx-w8 or onnx-int8")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    web.run_app(build_app(args.data, args.key, args.backend), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
