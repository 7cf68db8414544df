"""A multi-machine-shaped cluster on one machine: `tellodb head`, `tellodb node`s and `tellodb router`s
as separate processes, each with its own data directory, the way several machines would run them.

Used by the multi-node tests and the move and scaling benchmarks. Every process starts in its own
process group, so stopping one (SIGTERM, or SIGKILL for a crash) stops exactly what it started:
its Ray processes and node actor included. `close()` stops all of them.
"""

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

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int | None = None  # a router's HTTP port
    log_start: int = 0  # where this run's lines begin in the log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class LocalCluster:
    root: Path
    api_key: str
    shards: int = 16
    nodes: tuple[str, ...] = ("n1", "n2", "n3")
    extra_config: dict = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    head_port: int = 0
    model_seed: Path | None = None  # a data directory whose exported model (models/) nodes copy

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "cluster.yaml"
        lines = [f"shards: {self.shards}", f"nodes: [{', '.join(self.nodes)}]", "min_free_mb: 16"]
        lines += [f"{k}: {v}" for k, v in self.extra_config.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.head_port = self.head_port or free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
        self.env.pop("PORT", None)
        self.env.update({"HF_HUB_OFFLINE": "1", "TELLODB_API_KEY": self.api_key, "TELLODB_CONFIG": str(self.config),
                         "TELLODB_RAY_TOKEN_FILE": str(self.root / "head" / "ray_auth_token")})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    def _spawn(self, name: str, args: list[str], port: int | None = None, taskset: str | None = None,
               env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        start = len(log.read_text(errors="replace")) if log.exists() else 0
        cmd = [str(BIN / "tellodb"), *args]
        if taskset:
            cmd = ["taskset", "-c", taskset, *cmd]
        popen = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=str(self.root))
        proc = self.procs[name] = Proc(name, popen, log, port, start)
        return proc

    def _wait_for_line(self, proc: Proc, marker: str, timeout: float) -> None:
        """Wait for `marker` in what the process logged since it started (a restart appends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in proc.log_text()[proc.log_start:]:
                return
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_text()[-4000:]}")
            time.sleep(0.3)
        raise RuntimeError(f"{proc.name} not ready within {timeout:g} s:\n{proc.log_text()[-4000:]}")

    def start_head(self, timeout: float = 120, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> Proc:
        """The head on `<root>/head`; `env`: for the head alone (GCS fault tolerance's Redis, for one)."""
        proc = self._spawn("head", ["head", "--port", str(self.head_port), "--data-dir", str(self.root / "head"),
                                    *args], env=env)
        self._wait_for_line(proc, "Head ready", timeout)
        return proc

    def start_nodes(self, names: list[str], cpus: float = 1, timeout: float = 300,
                    taskset: dict[str, str] | None = None) -> list[Proc]:
        procs = []
        for name in names:
            data = self.root / name
            if self.model_seed is not None and not (data / "models").exists():
                shutil.copytree(self.model_seed / "models", data / "models")
            procs.append(self._spawn(name, ["node", "--address", self.address, "--name", name, "--data-dir",
                                            str(data), "--cpus", str(cpus)], taskset=(taskset or {}).get(name)))
        for proc in procs:
            self._wait_for_line(proc, f"Node ready name={proc.name}", timeout)
        return procs

    def start_routers(self, count: int, timeout: float = 180, first: int = 0) -> list[Proc]:
        procs = [self._spawn(f"router-{first + i}", ["router", "--address", self.address, "--port",
                                                     str(port := free_port())], port=port) for i in range(count)]
        for proc in procs:
            deadline = time.monotonic() + timeout
            while True:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited:\n{proc.log_text()[-4000:]}")
                try:
                    with urllib.request.urlopen(proc.url + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} not healthy:\n{proc.log_text()[-4000:]}")
                time.sleep(0.3)
        return procs

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run `tellodb <args>` (for example `cluster add-node n4 --url ...`) and return its result."""
        return subprocess.run([str(BIN / "tellodb"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=str(self.root))

    def stop(self, name: str, timeout: float = 60) -> int | None:
        """SIGTERM one process, then SIGKILL its whole group (whatever it left behind)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        try:
            proc.popen.send_signal(signal.SIGTERM)
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        _killpg(proc.popen)
        return code

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything it started (a crashed machine)."""
        proc = self.procs.pop(name, None)
        if proc is not None:
            _killpg(proc.popen)

    def close(self) -> None:
        for name in [n for n in self.procs if n.startswith("router")]:
            self.stop(name, timeout=30)
        for name in [n for n in self.procs if n != "head"]:
            self.stop(name, timeout=60)
        self.stop("head", timeout=30)


def _session(sid: int) -> list[int]:
    """Every process of session `sid` (Ray puts its workers in process groups of their own, but in
    the session of the role that started their raylet)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                found.append(int(entry))
    return found


def _killpg(popen: subprocess.Popen) -> None:
    """SIGKILL the role's process group and every other process of its session (a lost machine)."""
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in _session(popen.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
