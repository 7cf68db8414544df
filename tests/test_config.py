"""Configuration: cluster.yaml, then the environment, validated with messages that name the key."""

import pytest

from node.config import DEFAULT_MODEL, ClusterConfig, ConfigError, load_config


def test_defaults_without_file_or_env():
    c = load_config(None, env={})
    assert c == ClusterConfig()
    assert (c.host, c.port, c.shards, c.nodes) == ("127.0.0.1", 3000, 64, 2)
    assert (c.hnsw.connectivity, c.hnsw.ef_search) == (16, 64)
    assert c.embedding.model == DEFAULT_MODEL


def test_repo_cluster_yaml_matches_the_documented_defaults():
    from conftest import ROOT

    assert load_config(ROOT / "cluster.yaml", env={}) == ClusterConfig()


def test_seed_environment_variables_override_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("port: 4000\nshards: 16\nhnsw:\n  ef_search: 32\n")
    env = {
        "TELLODB_HOST": "0.0.0.0", "PORT": "5001", "TEMPORAL_MEMORY_PORT": "5002",
        "TELLODB_DATA_DIR": str(tmp_path), "TELLODB_API_KEY": "k" * 12,
        "TELLODB_HNSW_EF_SEARCH": "128", "TELLODB_HNSW_CONNECTIVITY": "24", "TEMPORAL_MEMORY_DEVICE": "CPU",
    }
    c = load_config(f, env)
    assert c.host == "0.0.0.0" and c.port == 5001  # PORT is read before TEMPORAL_MEMORY_PORT
    assert c.shards == 16 and c.data_dir == str(tmp_path) and c.api_key == "k" * 12
    assert (c.hnsw.ef_search, c.hnsw.connectivity) == (128, 24)
    assert not c.is_loopback


def test_seed_backend_names_are_accepted():
    from node.config import normalized_backend

    assert normalized_backend(load_config(None, {"TEMPORAL_MEMORY_EMBEDDING_BACKEND": "ort"})) == "onnx"
    assert normalized_backend(load_config(None, {"TEMPORAL_MEMORY_EMBEDDING_BACKEND": "candle"})) == "torch"
    assert normalized_backend(load_config(None, {"TEMPORAL_MEMORY_EMBEDDING_BACKEND": "ONNX-INT8"})) == "onnx-int8"
    assert normalized_backend(load_config(None, {})) == "onnx-w8"  # the default: 8-bit weights
    assert normalized_backend(load_config(None, {"TEMPORAL_MEMORY_EMBEDDING_BACKEND": "onnx-fp32"})) == "onnx"


def test_config_path_from_env(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("nodes: 3\n")
    assert load_config(None, {"TELLODB_CONFIG": str(f)}).nodes == 3


@pytest.mark.parametrize(
    "env, named",
    [
        ({"TELLODB_HNSW_EF_SEARCH": "abc"}, "TELLODB_HNSW_EF_SEARCH"),
        ({"TELLODB_HNSW_CONNECTIVITY": "0"}, "TELLODB_HNSW_CONNECTIVITY"),
        ({"PORT": "70000"}, "PORT"),
        ({"TEMPORAL_MEMORY_PORT": "x"}, "TEMPORAL_MEMORY_PORT"),
        ({"TEMPORAL_MEMORY_EMBEDDING_BACKEND": "tensorflow"}, "TEMPORAL_MEMORY_EMBEDDING_BACKEND"),
        ({"TEMPORAL_MEMORY_EMBEDDING_MODEL": "/no/such/folder"}, "TEMPORAL_MEMORY_EMBEDDING_MODEL"),
        ({"TEMPORAL_MEMORY_DEVICE": "tpu"}, "TEMPORAL_MEMORY_DEVICE"),
        ({"TELLODB_API_KEY": "short"}, "TELLODB_API_KEY"),
        ({"TELLODB_INDEX_MEMORY_MB": "-1"}, "TELLODB_INDEX_MEMORY_MB"),
        ({"TELLODB_AUTO_REBALANCE": "maybe"}, "TELLODB_AUTO_REBALANCE"),
        ({"TELLODB_REBALANCE_MAX_BYTES_PER_S": "-1"}, "TELLODB_REBALANCE_MAX_BYTES_PER_S"),
    ],
)
def test_bad_environment_values_name_the_variable(env, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, env)


@pytest.mark.parametrize(
    "yaml_text, named",
    [
        ("shardz: 4\n", "shardz"),
        ("shards: 0\n", "shards"),
        ("shards: many\n", "shards"),
        ("hnsw:\n  ef_serch: 3\n", "hnsw.ef_serch"),
        ("embedding: 5\n", "embedding"),
        ("- a\n- b\n", "mapping"),
        ("port: [1\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, named):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named):
        load_config(f, env={})


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})


def test_nodes_may_be_a_count_or_a_list_of_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("nodes: [alpha, beta-2, gamma.3]\n")
    config = load_config(cfg, env={})
    assert config.nodes == 3 and config.node_names == ["alpha", "beta-2", "gamma.3"]
    assert load_config(None, env={"TELLODB_NODES": "3"}).node_names == ["node-0", "node-1", "node-2"]
    for bad in ("nodes: [a, a]\n", "nodes: ['a b']\n", "nodes: [1]\n"):
        cfg.write_text(bad)
        with pytest.raises(ConfigError, match="nodes: names must be distinct"):
            load_config(cfg, env={})


def test_rebalancing_on_its_own_is_off_and_moves_are_paced_by_default(tmp_path):
    """auto_rebalance: data moves when an operator says so, unless turned on; moves copy at most
    rebalance.max_bytes_per_s (0: no limit)."""
    c = load_config(None, env={})
    assert c.auto_rebalance is False and c.rebalance.max_bytes_per_s == 50_000_000
    c = load_config(None, env={"TELLODB_AUTO_REBALANCE": "true", "TELLODB_REBALANCE_MAX_BYTES_PER_S": "0"})
    assert c.auto_rebalance is True and c.rebalance.max_bytes_per_s == 0
    f = tmp_path / "c.yaml"
    f.write_text("auto_rebalance: yes\nrebalance:\n  max_bytes_per_s: 1000000\n")
    c = load_config(f, env={})
    assert c.auto_rebalance is True and c.rebalance.max_bytes_per_s == 1_000_000
    f.write_text("auto_rebalance: 2\n")
    with pytest.raises(ConfigError, match="auto_rebalance"):
        load_config(f, env={})
