"""Mixed load through one or more routers with the official SDK: writers with their own ids, readers.

Each writer thread ingests memories with ids it chooses (`<entity>::load::<n>`), so every
acknowledged write can be checked afterwards (`acked`); each reader queries entities it picks at
random. Every failed request is recorded with the router it went to (`errors`), and each
request's latency is kept per router and kind, so a test counts failures and a benchmark gets
percentiles. `stop_router(url)` tells the generator a router is being killed on purpose: requests
to it from then on are counted apart (`to_stopped`), not as engine failures.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tellodb import TellodbClient

WORDS = ("apple river garden piano coffee travel mountain winter guitar novel python ocean tennis "
         "museum dinner bicycle sunset library market festival").split()


def text_for(entity: str, n: int) -> str:
    rnd = random.Random(f"{entity}/{n}")
    return f"{entity} note {n}: " + " ".join(rnd.choice(WORDS) for _ in range(12))


@dataclass
class MixedLoad:
    urls: list[str]
    api_key: str
    writers_per_router: int = 1
    readers_per_router: int = 1
    entities: int = 20
    prefix: str = "load"
    pause_s: float = 0.0
    acked: dict[str, tuple[str, str]] = field(default_factory=dict)  # memory id -> (entity, text)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (router, kind, message)
    error_at: list[float] = field(default_factory=list)  # time.monotonic() of each error, as in `errors`
    to_stopped: int = 0
    latencies: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)  # (router, kind) -> (t, s)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._stopped_urls: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def entity(self, i: int) -> str:
        return f"{self.prefix}:user-{i}"

    def start(self) -> MixedLoad:
        for url in self.urls:
            for w in range(self.writers_per_router):
                self._threads.append(threading.Thread(target=self._writer, args=(url, f"{url[-5:]}-{w}"), daemon=True))
            for r in range(self.readers_per_router):
                self._threads.append(threading.Thread(target=self._reader, args=(url, r), daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def stop_router(self, url: str) -> None:
        with self._lock:
            self._stopped_urls.add(url)

    def _record(self, url: str, kind: str, started: float, error: Exception | None) -> None:
        with self._lock:
            if error is None:
                self.latencies.setdefault((url, kind), []).append((started, time.monotonic() - started))
            elif url in self._stopped_urls:
                self.to_stopped += 1
            else:
                self.errors.append((url, kind, f"{type(error).__name__}: {error}"[:300]))
                self.error_at.append(time.monotonic())

    def _writer(self, url: str, tag: str) -> None:
        client = TellodbClient.from_cloud(base_url=url, api_key=self.api_key, timeout=60)
        rnd = random.Random(tag)
        n = 0
        while not self._stop.is_set() and url not in self._stopped_urls:
            entity = self.entity(rnd.randrange(self.entities))
            memory_id = f"{entity}::{tag}::{n}"
            text = text_for(entity, n)
            started = time.monotonic()
            try:
                client.ingest(entity_id=entity, text=text, memory_id=memory_id)
            except Exception as exc:  # the SDK's HTTP errors and connection errors alike
                self._record(url, "write", started, exc)
            else:
                self._record(url, "write", started, None)
                with self._lock:
                    self.acked[memory_id] = (entity, text)
            n += 1
            if self.pause_s:
                time.sleep(self.pause_s)

    def _reader(self, url: str, r: int) -> None:
        client = TellodbClient.from_cloud(base_url=url, api_key=self.api_key, timeout=60)
        rnd = random.Random(f"{url}/{r}")
        while not self._stop.is_set() and url not in self._stopped_urls:
            entity = self.entity(rnd.randrange(self.entities))
            started = time.monotonic()
            try:
                client.query(rnd.choice(WORDS), entity_id=entity, top_k=5)
            except Exception as exc:
                self._record(url, "read", started, exc)
            else:
                self._record(url, "read", started, None)
            if self.pause_s:
                time.sleep(self.pause_s)

    def missing(self, url: str, threads: int = 4) -> list[str]:
        """The acknowledged writes that do not read back through `url` as written (entity and text),
        read `threads` at a time, each thread with its own SDK client."""
        local = threading.local()

        def differs(item: tuple[str, tuple[str, str]]) -> bool:
            if not hasattr(local, "client"):
                local.client = TellodbClient.from_cloud(base_url=url, api_key=self.api_key, timeout=60)
            memory_id, (entity, text) = item
            found = local.client.inspect_memory(memory_id) or {}
            return (found.get("entity_id"), found.get("textual_content")) != (entity, text)

        items = sorted(self.acked.items())
        with ThreadPoolExecutor(threads) as pool:
            return [memory_id for (memory_id, _), bad in zip(items, pool.map(differs, items)) if bad]

    def count(self, kind: str) -> int:
        return sum(len(v) for (u, k), v in self.latencies.items() if k == kind)
