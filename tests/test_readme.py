"""The README's quick start, run for real: `tellodb serve` started as `make run` starts it (on a free
port and a temporary data directory), then the blocks marked `<!-- docs-test: NAME -->` in the README,
the HTTP API guide and the MCP guide, each run as a reader would run it, its output compared with what the page shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request

import pytest

from conftest import BIN, ROOT, Server, free_port

PAGES = (ROOT / "README.md", ROOT / "docs" / "guide" / "api.md", ROOT / "docs" / "guide" / "mcp.md")
MARKED = re.compile(r"^<!-- docs-test: (\w+) -->\n```(\w+)\n(.*?)^```", re.M | re.S)
README_URL = "http://127.0.0.1:3000"
DEV_KEY = "XXX1111AAA"  # the key a loopback engine without one accepts, as the README says


def marked_blocks() -> dict[str, tuple[str, str]]:
    """name -> (language, code) of every marked block; a name is used once."""
    blocks: dict[str, tuple[str, str]] = {}
    for page in PAGES:
        for name, lang, code in MARKED.findall(page.read_text(encoding="utf-8")):
            assert name not in blocks, f"docs-test {name} is marked twice"
            blocks[name] = (lang, code)
    return blocks


BLOCKS = marked_blocks()


def make_run_argv() -> list[str]:
    """The command `make run` ends in, as make itself prints it."""
    done = subprocess.run(["make", "--no-print-directory", "-n", "run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    [line] = [ln for ln in done.stdout.splitlines() if " serve" in ln]
    return shlex.split(line)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """`tellodb serve` as `make run` starts it: its own config file and no API key (the development
    key on loopback); only the port and the data directory differ, through their variables."""
    argv = make_run_argv()
    assert argv[0].endswith("/tellodb") and argv[1] == "serve", argv
    options = dict(zip(argv[2::2], argv[3::2]))
    assert set(options) == {"--config"}, f"make run passes {options}: teach this test to pass them too"
    root = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_", "RAY_"))}
    env.pop("PORT", None)
    port = free_port()
    env.update({"TELLODB_CONFIG": str(ROOT / options["--config"]), "TEMPORAL_MEMORY_PORT": str(port),
                "TEMPORAL_MEMORY_DATA_DIR": str(root / "data"), "HF_HUB_OFFLINE": "1"})
    (root / "data").mkdir()
    server = Server(root / "data", port, env, root / "serve.log")
    try:
        yield server.start()
    finally:
        server.kill()


def run(engine: Server, name: str, expected_lang: str) -> subprocess.CompletedProcess:
    """Run a marked block against the engine: only its address is changed."""
    lang, code = BLOCKS[name]
    assert lang == expected_lang and README_URL in code, f"docs-test {name}: a {lang} block without {README_URL}"
    code = code.replace(README_URL, engine.base_url)
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELLODB_", "TEMPORAL_MEMORY_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env, cwd=engine.data_dir.parent)
    assert done.returncode == 0, f"docs-test {name} failed:\n{done.stdout}\n{done.stderr}\n{engine.log_text()[-3000:]}"
    return done


def shown_output(code: str) -> list[str]:
    """The `# ...` lines a page shows as a block's output (after the commands)."""
    return [ln[2:] for ln in code.splitlines() if ln.startswith("# ")]


def test_the_quick_start_commands_are_the_makefiles():
    lang, code = BLOCKS["make"]
    assert lang == "bash"
    targets = [line.split()[1] for line in code.splitlines() if line.startswith("make ")]
    assert targets == ["run", "test"]
    for target in targets:
        done = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert make_run_argv()[1:] == ["serve", "--config", "cluster.yaml"]
    assert "pytest" in subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test"), "CI runs the README's command"


def test_the_health_check_answers_as_shown(engine):
    done = run(engine, "health", "bash")
    [shown] = shown_output(BLOCKS["health"][1])
    assert json.loads(done.stdout) == json.loads(shown)


def test_the_sdk_walkthrough_runs_and_ranks_as_shown(engine):
    done = run(engine, "sdk", "python")
    version, *hits = done.stdout.splitlines()
    asked = urllib.request.Request(engine.base_url + "/version", headers={"x-api-key": DEV_KEY})
    with urllib.request.urlopen(asked, timeout=10) as r:
        assert version == json.loads(r.read())["engine_version"]
    shown = [re.fullmatch(r"\[(\d\.\d+)\] (.+)", ln).groups() for ln in shown_output(BLOCKS["sdk"][1])]
    got = [re.fullmatch(r"\[(\d\.\d+)\] (.+)", ln).groups() for ln in hits]
    assert [text for _, text in got] == [text for _, text in shown]
    for (score, text), (shown_score, _) in zip(got, shown):
        assert abs(float(score) - float(shown_score)) <= 0.02, f"{text}: {score}, the README shows {shown_score}"


def test_the_mcp_client_of_the_guide_stores_and_recalls(engine):
    done = run(engine, "mcp", "python")
    assert "4471-B" in done.stdout and "is_error=False" in done.stdout.replace("isError=False", "is_error=False")


def test_the_api_guides_curl_walkthrough_gets_no_error(engine):
    """Every request of the HTTP API guide's sample answers without an error body; the export it
    saves holds the entity's lines and ends with its summary."""
    done = run(engine, "api", "bash")
    assert '{"error"' not in done.stdout, done.stdout
    assert "tellodb_ingest_total" in done.stdout  # the /metrics line of the sample
    exported = [json.loads(line) for line in (engine.data_dir.parent / "kai.jsonl").read_text().splitlines()]
    assert exported[-1]["type"] == "summary" and any(e["type"] == "memory" for e in exported)
