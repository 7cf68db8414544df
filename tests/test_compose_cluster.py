"""docker-compose.cluster.yml, the multi-machine-shaped Compose file, checked without a Docker engine.

The file is read for what the roles need to find each other and stay private (one Ray token for
every role, each node its own volume and name, the names in cluster.yaml, routers on 127.0.0.1
only, the key from the environment) and to survive the head going away (the GCS's tables in a
Redis with a password, nodes and routers waiting TELLODB_HEAD_OUTAGE_S, routers checked on /ready),
and `docker compose config` (or docker-compose) resolves it and refuses it without TELLODB_API_KEY
or TELLODB_REDIS_PASSWORD. The roles' commands themselves run in tests/test_helm.py
and tests/test_many_machines.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
import yaml

from conftest import API_KEY, ROOT
from test_docker import compose_cli, interpolate

COMPOSE = ROOT / "docker-compose.cluster.yml"
ROLES = ("head", "n1", "n2", "n3", "router-1", "router-2")
REDIS_PASSWORD = "redis-secret-for-tests"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def argv(service: dict) -> list[str]:
    """The tellodb command line inside a service's `sh -c "exec tellodb ..."`."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"] and command[2].startswith("exec tellodb "), command
    return shlex.split(command[2].replace("$$", "$"))[2:]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mounts(service: dict) -> dict[str, str]:
    """container path -> source of each volume."""
    out = {}
    for v in service["volumes"]:
        source, target = v.split(":")[:2]
        out[target] = source
    return out


def test_roles_share_one_token_and_one_config(compose):
    services = compose["services"]
    assert set(ROLES) <= set(services)
    cluster_yaml = yaml.safe_load((ROOT / "cluster.compose.yaml").read_text())
    token_service = services["ray-token"]
    [token_volume] = [v.split(":")[0] for v in token_service["volumes"]]
    assert token_volume in compose["volumes"], "a named volume"
    for name in ROLES:
        s = services[name]
        args = argv(s)
        assert args[0] == {"head": "head", "router-1": "router", "router-2": "router"}.get(name, "node")
        env = s["environment"]
        m = mounts(s)
        token_file = option(args, "--ray-token-file") if "--ray-token-file" in args else env["TELLODB_RAY_TOKEN_FILE"]
        assert m[os.path.dirname(token_file)] == token_volume, name
        assert f"{token_volume}:{os.path.dirname(token_file)}:ro" in s["volumes"], "read-only for the roles"
        config = option(args, "--config") if "--config" in args else env["TELLODB_CONFIG"]
        assert m[config] == "./cluster.compose.yaml", name
        assert option(args, "--node-ip") == "$(hostname -i)", "Ray's address is the container's own"
        if name != "head":
            assert option(args, "--address") == f"head:{option(argv(services['head']), '--port')}"
        assert s["init"] is True and "shm_size" in s
    head = services["head"]
    assert head["depends_on"]["ray-token"]["condition"] == "service_completed_successfully"
    assert "token" in " ".join(token_service["command"]) and "10001" in " ".join(token_service["command"])
    assert token_service["network_mode"] == "none"
    nodes = [option(argv(services[n]), "--name") for n in ("n1", "n2", "n3")]
    assert nodes == cluster_yaml["nodes"], "the first members are the node services"


def test_each_node_has_its_own_volume(compose):
    services = compose["services"]
    data = {}
    for name in ("head", "n1", "n2", "n3"):
        args = argv(services[name])
        source = mounts(services[name])[option(args, "--data-dir")]
        assert source in compose["volumes"], f"{name}: a named volume (it starts with the image's ONNX export)"
        data[name] = source
    assert len(set(data.values())) == 4, data
    for name in ("n1", "n2", "n3"):
        assert services[name]["depends_on"]["head"]["condition"] == "service_healthy"
    assert "6380" in " ".join(services["head"]["healthcheck"]["test"])


def test_routers_only_on_loopback_with_the_key_from_the_environment(compose):
    services = compose["services"]
    published = []
    for name, s in services.items():
        for port in s.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
            published.append(str(port).split(":")[1])
        if name not in ("router-1", "router-2"):
            assert "ports" not in s, f"{name}: Ray's ports stay on the Compose network"
            assert not any("API_KEY" in k for k in s.get("environment", {})), name
    assert sorted(published) == ["3000", "3001"]
    for name in ("router-1", "router-2"):
        s = services[name]
        key = s["environment"]["TELLODB_API_KEY"]
        assert re.fullmatch(r"\$\{TELLODB_API_KEY:\?[^}]+\}", key)
        with pytest.raises(ValueError, match="TELLODB_API_KEY"):
            interpolate(key, {})
        assert option(argv(s), "--host") == "0.0.0.0" and option(argv(s), "--port") == "3000"
        assert "/ready" in " ".join(s["healthcheck"]["test"]), "ready: the router can route now"


def test_the_gcs_keeps_its_tables_in_a_redis_with_a_password(compose):
    services = compose["services"]
    redis, head = services["redis"], services["head"]
    assert redis["image"].startswith("redis:") and redis["restart"] == "unless-stopped"
    command = redis["command"]
    assert command[0] == "redis-server", "the image's entrypoint drops root only for redis-server"
    password = command[command.index("--requirepass") + 1]
    assert re.fullmatch(r"\$\{TELLODB_REDIS_PASSWORD:\?[^}]+\}", password)
    with pytest.raises(ValueError, match="TELLODB_REDIS_PASSWORD"):
        interpolate(password, {})
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"] in compose["volumes"], "the append-only file on a named volume"
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert redis["environment"]["REDISCLI_AUTH"] == password, "the healthcheck's redis-cli authenticates"
    assert redis["networks"] == head["networks"] and "ports" not in redis

    env = head["environment"]
    assert env["RAY_REDIS_ADDRESS"] == "redis:6379"
    assert env["RAY_REDIS_PASSWORD"] == password
    assert env["RAY_external_storage_namespace"]
    assert head["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, s in services.items():  # the password goes to Redis and the head only
        if name not in ("redis", "head"):
            assert not any("REDIS" in k for k in s.get("environment", {})), name


def test_nodes_and_routers_outlive_a_head_outage(compose):
    from node.config import ENV_VARS

    assert ("TELLODB_HEAD_OUTAGE_S", "head_outage_s") in ENV_VARS, "the variable the roles read"
    services = compose["services"]
    for name in ("n1", "n2", "n3", "router-1", "router-2"):
        assert float(services[name]["environment"]["TELLODB_HEAD_OUTAGE_S"]) == 600, name
        assert services[name]["restart"] == "unless-stopped"
    assert services["head"]["restart"] == "unless-stopped", "Compose brings a crashed head back"


def test_cluster_compose_file_validates_with_compose():
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose here: `make ops-deps` installs docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_"))}
    run = [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config"]
    secrets = {"TELLODB_API_KEY": API_KEY, "TELLODB_REDIS_PASSWORD": REDIS_PASSWORD}
    done = subprocess.run(run, env={**env, **secrets}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(ROLES) | {"ray-token", "redis"} == set(resolved["services"])
    for name in ("router-1", "router-2"):
        assert resolved["services"][name]["environment"]["TELLODB_API_KEY"] == API_KEY
    assert resolved["services"]["n1"]["depends_on"]["head"]["condition"] == "service_healthy"
    assert resolved["services"]["head"]["environment"]["RAY_REDIS_PASSWORD"] == REDIS_PASSWORD
    redis = resolved["services"]["redis"]
    assert redis["command"][redis["command"].index("--requirepass") + 1] == REDIS_PASSWORD
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD
    for missing in secrets:
        given = {k: v for k, v in secrets.items() if k != missing}
        refused = subprocess.run(run, env={**env, **given}, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and missing in refused.stderr, f"compose must refuse to start without {missing}"
