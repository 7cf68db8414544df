"""Locust scenarios for any tellodb deployment (`pip install locust`, or `make loadtest-install`).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000              # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:3000 --headless -u 32 -r 8 -t 5m AgentLoop

Set TELLODB_API_KEY for the key (default: the development key). Users:
  AgentLoop   query the user's memories, then store the new message (an agent's turn)
  BulkImport  POST /ingest/batch with 64 memories at a time
  ReadHeavy   19 queries for every ingest
Entities are drawn from TELLODB_LOADTEST_ENTITIES (default 1000) per run tag, so runs do not mix.
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, between, task
from texts import query_text, sentence  # locust puts this folder on sys.path

KEY = os.environ.get("TELLODB_API_KEY", "XXX1111AAA")
ENTITIES = int(os.environ.get("TELLODB_LOADTEST_ENTITIES", "1000"))
RUN = f"locust{int(time.time())}"


def text() -> str:
    return sentence(random, random.randrange(10**9))


class _Tellodb(HttpUser):
    abstract = True
    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.client.headers.update({"x-api-key": KEY})
        self.entity = f"{RUN}:{random.randrange(ENTITIES)}"

    def query(self) -> None:
        self.client.post("/query/semantic", name="query",
                         json={"textual_query": query_text(random), "entity_id": self.entity,
                               "limit": 10})

    def ingest(self) -> None:
        self.client.post("/ingest", name="ingest", json={"entity_id": self.entity, "textual_content": text()})


class AgentLoop(_Tellodb):
    @task
    def turn(self) -> None:
        self.query()
        self.ingest()


class BulkImport(_Tellodb):
    @task
    def batch(self) -> None:
        items = [{"entity_id": f"{RUN}:{random.randrange(ENTITIES)}", "textual_content": text()} for _ in range(64)]
        self.client.post("/ingest/batch", name="ingest_batch", json={"items": items})


class ReadHeavy(_Tellodb):
    @task(19)
    def read(self) -> None:
        self.query()

    @task(1)
    def write(self) -> None:
        self.ingest()
