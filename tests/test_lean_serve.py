"""`tellodb serve` is lean before its first request (docs/benchmarks.md, "Lean engine: memory
before the first request"): its private Ray starts only the processes the engine uses, a node
actor never keeps torch (the export runs in a child process), and the ONNX session maps the
model's weights from a file and keeps no memory arena. Configuration, not figures: the figures
come from `python loadtest/memory_profile.py --serve`.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
from conftest import http_json
from test_ray_exposure import process_tree

from node.config import DEFAULT_MODEL
from node.embedder import load_embedder
from node.model_files import find_export


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mapped_files(pid: int) -> set[str]:
    """The files a process maps (its libraries, and files mapped as data)."""
    return {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_serve_runs_only_what_the_engine_uses(make_server):
    # A fresh data directory: this first start exports the model, which imports torch.
    server = make_server(seed_model=False).start(timeout=300)
    status, ready = http_json(server.base_url, "/ready")
    assert status == 200 and ready["ready"], ready
    tree = process_tree(server.proc.pid)
    commands = {pid: cmdline(pid) for pid in tree}

    def running(piece: str) -> list[int]:
        return [pid for pid, cmd in commands.items() if piece in cmd]

    # Ray's servers the engine uses, and the log monitor that brings the actors' log lines to stderr.
    for piece in ("gcs_server", "raylet/raylet", "log_monitor.py"):
        assert running(piece), f"no {piece} among {sorted(commands.values())}"
    # Not started: the dashboard's API server (ray.init starts it even with include_dashboard=False)
    # and the autoscaler monitor (a fixed cluster on one machine).
    assert not running("dashboard/dashboard.py"), commands
    assert not running("autoscaler/_private/monitor.py"), commands

    nodes = running("ExposedNode")
    assert len(nodes) == 2, commands
    files = {pid: mapped_files(pid) for pid in nodes}
    torch = {pid: [f for f in found if "/torch/" in f][:3] for pid, found in files.items()}
    assert not any(torch.values()), f"node actors loaded torch: {torch}"  # the one that exported, before
    models = str(server.data_dir / "models")
    weights = {pid: [f for f in found if f.startswith(models) and ".mapped-" in f] for pid, found in files.items()}
    assert all(w and all(f.endswith(".data") for f in w) for w in weights.values()), weights

    # Ray's processes share the engine's fate, as with ray.init: a SIGKILL of the engine's process
    # alone ends them (Server.kill would kill its whole process group; this test does not).
    ray_pids = set(tree) - {server.proc.pid}
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    deadline = time.monotonic() + 120
    while (left := [pid for pid in ray_pids if cmdline(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, {pid: cmdline(pid) for pid in left}


def test_the_onnx_session_maps_the_model_and_keeps_no_arena(model_seed, tmp_path):
    import onnxruntime as ort

    shutil.copytree(model_seed / "models", tmp_path / "models")  # the mapped copy is made beside the export
    export = find_export(DEFAULT_MODEL, str(tmp_path))
    assert export is not None
    onnx = load_embedder(str(export), "onnx", "cpu", 1, str(tmp_path))
    assert onnx.onnx_path == export / "model.onnx"  # what info() reports: the export itself
    assert onnx.session.get_session_options().enable_cpu_mem_arena is False
    data = [f for f in mapped_files(os.getpid()) if f.startswith(str(export)) and ".mapped-" in f]
    assert data and all(f.endswith(".data") for f in data), data

    # The same vectors as the export run as it is.
    plain = ort.InferenceSession(str(onnx.onnx_path), providers=["CPUExecutionProvider"])
    texts = ["User prefers dark mode and uses a screen reader", "短い文", "a much longer sentence " * 40]
    for text in texts:
        ids = np.array([onnx.tokenizer.encode(text).ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        hidden = plain.run(None, {i.name: feed[i.name] for i in plain.get_inputs()})[0][0].mean(axis=0)
        np.testing.assert_allclose(onnx.encode([text])[0], hidden / np.linalg.norm(hidden), atol=1e-5)
