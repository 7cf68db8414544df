"""`--ray-port-range LOW-HIGH` (config `ray_port_range`, TELLODB_RAY_PORT_RANGE) keeps every port a
role's Ray processes listen on inside the range, for firewalls and NetworkPolicies: checked through
/proc on a head, a node and a router started with ranges of their own."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from conftest import API_KEY, free_port
from loadtest.local_cluster import LocalCluster
from node.config import ConfigError, load_config
from router.ray_node import port_plan
from test_ray_exposure import listeners_of, process_tree

WIDTH = 40  # ports per role


def free_block(count: int) -> int:
    """The first port of `count` consecutive ports nobody listens on."""
    for base in range(21000, 31000, 500):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def test_the_plan_puts_rays_fixed_ports_first_and_the_workers_after():
    plan = port_plan((20000, 20100), gcs_port=20000)
    fixed = [v for k, v in plan.items() if not k.endswith("worker_port")]
    assert sorted(fixed) == list(range(20001, 20008)) and plan["AUTOSCALER_METRIC_PORT"] == 20007  # a head's
    assert (plan["min_worker_port"], plan["max_worker_port"]) == (20008, 20100)
    assert port_plan((20000, 20100))["min_worker_port"] == 20006  # a node or router: no GCS, no autoscaler
    assert port_plan(None) == {}
    assert "metrics_agent_port" not in port_plan((20000, 20100), agent=False)  # minimal Ray: no agent to reach
    with pytest.raises(ConfigError, match="GCS port 6380"):
        port_plan((20000, 20100), gcs_port=6380)


@pytest.mark.parametrize("value, problem", [("20000", "LOW-HIGH"), ("20100-20000", "LOW-HIGH"),
                                            ("80-200", "LOW-HIGH"), ("20000-20005", "at least 16")])
def test_a_bad_range_names_the_setting(value, problem):
    with pytest.raises(ConfigError, match=f"TELLODB_RAY_PORT_RANGE \\(ray_port_range\\): .*{problem}"):
        load_config(None, {"TELLODB_RAY_PORT_RANGE": value})


def test_every_ray_port_of_each_role_is_inside_its_range(tmp_path, model_seed):
    base = free_block(3 * WIDTH)
    ranges = {role: (base + i * WIDTH, base + (i + 1) * WIDTH - 1) for i, role in enumerate(("head", "n1", "router"))}
    spec = {role: f"{low}-{high}" for role, (low, high) in ranges.items()}
    c = LocalCluster(tmp_path / "cluster", API_KEY, shards=4, nodes=("n1",), head_port=ranges["head"][0])
    try:
        c.start_head(args=("--ray-port-range", spec["head"]))
        shutil.copytree(model_seed / "models", c.root / "n1" / "models")
        node = c._spawn("n1", ["node", "--address", c.address, "--name", "n1", "--data-dir", str(c.root / "n1"),
                               "--cpus", "1"], env={"TELLODB_RAY_PORT_RANGE": spec["n1"]})  # the variable works too
        c._wait_for_line(node, "Node ready name=n1", 300)
        router = c._spawn("router", ["router", "--address", c.address, "--port", str(http := free_port()),
                                     "--ray-port-range", spec["router"]], port=http)
        c._wait_for_line(router, "Memory Engine live", 180)
        time.sleep(2)  # workers the raylets start once the roles are up
        for role, (low, high) in ranges.items():
            found = [s for s in listeners_of(process_tree(c.procs[role].popen.pid)) if s[3] != http]
            names = {name for _, name, _, _ in found}
            assert "raylet" in names and ("gcs_server" in names) == (role == "head"), found
            outside = [s for s in found if not low <= s[3] <= high]
            assert not outside, f"{role}: listening outside {low}-{high}: {outside}"
        status = c.cli("cluster", "status", "--url", router.url, "--key", API_KEY)
        assert status.returncode == 0 and "n1" in status.stdout, status.stderr
    finally:
        c.close()
