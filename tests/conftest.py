"""Fixtures that build real components: the real model, real SQLite and Chroma, real Ray, and a
real `tellodb serve` subprocess for end-to-end tests. Nothing users run is mocked."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def embedder():
    from node.config import DEFAULT_MODEL, resolve_model_path
    from node.embedder import Embedder

    return Embedder(resolve_model_path(DEFAULT_MODEL), "cpu", threads=1)


@pytest.fixture
def make_store(tmp_path, embedder):
    """Build ShardStores in a fresh folder: `make_store()` or `make_store(root=..., shard_id=...)`."""
    from node.store import ShardStore

    stores = []

    def build(root: Path | None = None, shard_id: int = 0):
        store = ShardStore(root or tmp_path / f"shard-{shard_id}", shard_id, embedder.dimension)
        stores.append(store)
        return store

    yield build
    for s in stores:
        try:
            s.close()
        except Exception:
            pass


def http_json(base: str, path: str, body: object = None, timeout: float = 60) -> tuple[int, object]:
    """(status, JSON answer) of a GET (no body) or POST to a real server, errors included."""
    import json
    import urllib.error

    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST",
                                 headers={"x-api-key": API_KEY, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `tellodb serve` subprocess in its own process group."""

    data_dir: Path
    port: int
    env: dict
    log_path: Path
    proc: subprocess.Popen | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "Server":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "tellodb"), "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(self.data_dir.parent),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"server did not become healthy:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process tree (the server, Ray and its workers)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def make_server(tmp_path, model_seed):
    """Factory for `tellodb serve` subprocesses on a random port with a fresh data dir, which holds
    the session's model export already (`seed_model=False`: the first start exports it)."""
    servers: list[Server] = []

    def build(data_dir: Path | None = None, port: int | None = None, seed_model: bool = True,
              **env_overrides: str) -> Server:
        data_dir = data_dir or tmp_path / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        if seed_model:
            link_models(model_seed, data_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
        env.pop("PORT", None)
        env.update({
            "TEMPORAL_MEMORY_HOST": "127.0.0.1",
            "TEMPORAL_MEMORY_PORT": str(port or free_port()),
            "TEMPORAL_MEMORY_DATA_DIR": str(data_dir),
            "TEMPORAL_MEMORY_API_KEY": API_KEY,
            "TELLODB_SHARDS": "8",
            "HF_HUB_OFFLINE": "1",
        })
        env.update(env_overrides)
        server = Server(data_dir, int(env["TEMPORAL_MEMORY_PORT"]), env, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return server

    yield build
    for s in servers:
        s.kill()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real in-process cluster: local Ray, two node actors, eight shards."""
    from node.config import ClusterConfig
    from router.cluster import Cluster

    data = tmp_path_factory.mktemp("cluster-data")
    c = Cluster(ClusterConfig(data_dir=str(data), shards=8, nodes=2, api_key=API_KEY))
    c.start()
    yield c
    c.shutdown()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
async def api(aiohttp_client, cluster):
    """An in-process HTTP client for the API, backed by the real cluster."""
    from router.app import create_app

    return await aiohttp_client(create_app(cluster.config, cluster))


@pytest.fixture(scope="session")
def model_seed(tmp_path_factory):
    """A data directory holding the exported ONNX model and its mapped copy, copied into each
    `tellodb node`'s and linked into each `make_server`'s (one export for the session, not one per
    data directory: about 8 s each)."""
    from node.config import DEFAULT_MODEL, EmbeddingConfig, resolve_model_path
    from node.onnx_embedder import export_onnx, mapped_model

    seed = tmp_path_factory.mktemp("model-seed")
    mapped_model(export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), EmbeddingConfig().backend))
    return seed


def link_models(seed: Path, data_dir: Path) -> None:
    """`seed`'s models/ into a data directory that has none, as hard links (nothing is copied; the
    engine only ever adds files beside them). Where links cannot be made (another file system) the
    engine exports the model itself, as on a first start."""
    if (data_dir / "models").exists():
        return
    try:
        shutil.copytree(seed / "models", data_dir / "models", copy_function=os.link)
    except OSError:
        shutil.rmtree(data_dir / "models", ignore_errors=True)


def cluster_status(cluster, url: str) -> dict:
    """`tellodb cluster status --json` of a loadtest.local_cluster.LocalCluster through the router at `url`."""
    import json

    done = cluster.cli("cluster", "status", "--json", "--url", url, "--key", API_KEY)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def write_fixed(client, entities: list[str], texts: list[str]) -> None:
    """Each entity's memories `<entity>::fixed::<j>`, one per text, for `fixed_answers` to read back."""
    for e in entities:
        for j, text in enumerate(texts):
            client.ingest(entity_id=e, text=f"{e} {text}", memory_id=f"{e}::fixed::{j}", timestamp=1_700_000_000_000 + j)


def check_load(url: str, load, least: int = 50) -> None:
    """No request of a loadtest.mixed_load.MixedLoad failed, more than `least` writes and reads ran,
    and every write it had acknowledged reads back the same through `url`."""
    assert load.errors == [], load.errors[:5]
    assert load.count("write") > least and load.count("read") > least
    missing = load.missing(url)
    assert not missing, f"{len(missing)} of {len(load.acked)} acknowledged writes not found: {missing[:5]}"


def fixed_answers(client, entities: list[str]) -> dict[str, list[str]]:
    """Each entity's top answers, and one query over every entity (a fan-out to every node)."""
    found = {e: [h.memory_id for h in client.query("what does this user do", entity_id=e, top_k=3)] for e in entities}
    found["*"] = sorted(h.memory_id for h in client.query("who plays the cello", top_k=len(entities)))
    return found


@pytest.fixture
def replicated(tmp_path, model_seed):
    """A head, three `tellodb node`s (n1-n3, `replication: 2`, 8 shards) and no router yet, as
    processes on this machine (loadtest.local_cluster); every process stopped at the end."""
    from loadtest.local_cluster import LocalCluster

    c = LocalCluster(tmp_path / "cluster", API_KEY, shards=8, nodes=("n1", "n2", "n3"), model_seed=model_seed,
                     extra_config={"replication": 2, "failover_after_s": 2})
    try:
        yield c
    finally:
        c.close()
