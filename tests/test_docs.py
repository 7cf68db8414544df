"""The docs as a reader meets them: every relative link and anchor resolves, samples hold no path of
one machine and set every shell variable they use, every configuration key is documented, the
README stays a landing page, and `make recall` without LoCoMo says where to get it."""

from __future__ import annotations

import re
import subprocess
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT
from node.config import ENV_VARS, ClusterConfig, EmbeddingConfig, HnswConfig, RebalanceConfig

README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "helm" / "tellodb" / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text outside fenced blocks (a `# comment` in a sample is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(path.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        n = 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc):
    broken = []
    for target in LINK.findall(prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check here
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert not broken, f"{rel(doc)}: " + "; ".join(broken)


def test_the_docs_name_no_path_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        assert "/work/" not in text and "../shared" not in text, f"{rel(doc)} names a path of one machine"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_shell_variable_of_a_sample_is_set_before_it_is_used(doc):
    """In the order a reader runs a page's shell blocks; `$(...)` is a command, not a variable."""
    defined: set[str] = set()
    unset = []
    for lang, block in FENCE.findall(doc.read_text(encoding="utf-8")):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in block.splitlines():
            code = "" if line.lstrip().startswith("#") else line.split(" #")[0]
            unset += [f"${v} in: {line.strip()}" for v in re.findall(r"\$\{?([A-Za-z_]\w*)", code) if v not in defined]
            defined.update(re.findall(r"(?:^|[\s;(])(?:export\s+)?([A-Za-z_]\w*)=", code))
    assert not unset, f"{rel(doc)}: " + "; ".join(unset)


def test_every_configuration_key_and_variable_is_in_the_configuration_guide():
    guide = (ROOT / "docs" / "guide" / "configuration.md").read_text(encoding="utf-8")
    keys = [f for f in ClusterConfig.__dataclass_fields__ if f not in ("embedding", "hnsw", "rebalance", "node_list")]
    keys += [f"embedding.{f}" for f in EmbeddingConfig.__dataclass_fields__]
    keys += [f"hnsw.{f}" for f in HnswConfig.__dataclass_fields__]
    keys += [f"rebalance.{f}" for f in RebalanceConfig.__dataclass_fields__]
    missing = [k for k in keys if f"`{k}`" not in guide]
    missing += [v for v, _ in ENV_VARS if f"`{v}`" not in guide]
    assert not missing, f"docs/guide/configuration.md does not document {missing}"


def test_the_readme_is_a_landing_page_that_links_every_guide():
    text = README.read_text(encoding="utf-8")
    assert 150 <= len(text.splitlines()) <= 250
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)}
    unlinked = [rel(d) for d in DOCS if d != README and d.resolve() not in linked]
    assert not unlinked, f"the README links no way to {unlinked}"


def test_make_recall_without_locomo_says_where_to_get_it_and_installs_nothing(tmp_path):
    venv = tmp_path / "venv"  # the check runs before the install; a venv here means it did not
    for extra in ([], [f"LOCOMO={tmp_path / 'missing.json'}"]):
        done = subprocess.run(["make", "--no-print-directory", "recall", f"VENV={venv}", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert done.returncode != 0
        assert "https://github.com/snap-research/locomo" in done.stderr and "locomo10.json" in done.stderr
        assert "LOCOMO=/path/to/locomo-dev.json" in done.stderr and "Traceback" not in done.stderr
        assert not venv.exists()
