"""The ONNX Runtime path: exported offline from the local model, cached, and equal to torch's vectors;
the export folder runs on its own (tests/test_lean_install.py runs it where torch is absent)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN

from node.config import DEFAULT_MODEL, model_dimension, resolve_model_path
from node.embedder import load_embedder
from node.model_files import find_export, is_export
from node.onnx_embedder import export_onnx, onnx_cache_dir

TEXTS = ["User prefers dark mode and uses a screen reader", "Caroline: I went to the LGBTQ support group",
         "短い文", "a much longer sentence " * 40]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx-data"))


@pytest.mark.parametrize("backend, min_cosine", [("onnx", 0.9999), ("onnx-w8", 0.99), ("onnx-int8", 0.97)])
def test_onnx_vectors_match_sentence_transformers(embedder, data_dir, backend, min_cosine):
    onnx = load_embedder(resolve_model_path(DEFAULT_MODEL), backend, "cpu", 1, data_dir)
    assert onnx.dimension == embedder.dimension
    got, want = onnx.encode(TEXTS), embedder.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * want).sum(axis=1).min() >= min_cosine
    assert onnx.encode([]).shape == (0, embedder.dimension)


def test_the_default_backend_runs_8_bit_weights(data_dir):
    """onnx-w8 (the default) is the fp32 export with every matrix product's weights in 8-bit blocks:
    MatMulNBits nodes, no fp32 MatMul left with a constant weight (docs/benchmarks.md, "8-bit weights")."""
    import onnx

    from node.config import EmbeddingConfig

    assert EmbeddingConfig().backend == "onnx-w8"
    graph = onnx.load(str(export_onnx(resolve_model_path(DEFAULT_MODEL), data_dir, "onnx-w8"))).graph
    constants = {i.name for i in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 36  # 6 layers x (4 attention + 2 feed-forward) products at least
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {8}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def test_export_is_cached_per_data_dir(data_dir):
    model = resolve_model_path(DEFAULT_MODEL)
    path = export_onnx(model, data_dir, "onnx")
    stamp = path.stat().st_mtime_ns
    assert export_onnx(model, data_dir, "onnx") == path and path.stat().st_mtime_ns == stamp
    assert path.parent == onnx_cache_dir(model, data_dir)
    assert not list(path.parent.glob("*.tmp.onnx"))



EXPORT = """
import logging, sys
from node.onnx_embedder import export_onnx
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
print(export_onnx(sys.argv[1], sys.argv[2], "onnx"))
"""


def test_nodes_starting_together_export_once(tmp_path):
    """Node actors on one machine start together on a fresh data directory: one exports, the
    others wait for its file (a lock next to it) instead of each running the export."""
    model = resolve_model_path(DEFAULT_MODEL)
    procs = [subprocess.Popen([sys.executable, "-c", EXPORT, model, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert paths == {str(onnx_cache_dir(model, str(tmp_path)) / "model.onnx")}
    assert sum(err.count("Exporting the embedding model") for _, err in outputs) == 1, outputs


def test_the_router_leaves_the_model_to_the_nodes():
    """The router process never loads torch nor exports the model: each node does (under a lock)."""
    check = ("import sys, router.cli, router.cluster, router.app; "
             "print(sorted(m for m in ('torch', 'transformers', 'node.onnx_embedder') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_export_runs_without_the_model_folder(embedder, tmp_path):
    """`tellodb export-model` on one machine, its models/ copied to another data directory: the
    copy alone (model.onnx beside the tokenizer and configs, source.json naming the model) embeds
    like the model itself, which is how an install without torch nor the model package runs."""
    exported = tmp_path / "exported"
    done = subprocess.run([str(BIN / "tellodb"), "export-model", "--data-dir", str(exported), "--backend", "onnx-int8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    int8 = Path(done.stdout.strip())
    assert int8.name == "model-int8.onnx" and (int8.parent / "model.onnx").exists()
    assert json.loads((int8.parent / "source.json").read_text())["model"] == DEFAULT_MODEL
    assert not list(int8.parent.rglob("*.safetensors")), "the weights stay out: model.onnx has them"

    copy = tmp_path / "elsewhere"
    shutil.copytree(exported / "models", copy / "models")
    found = find_export(DEFAULT_MODEL, str(copy))
    assert found is not None and found.parent == copy / "models" and is_export(found)
    assert model_dimension(str(found)) == embedder.dimension
    for backend, min_cosine in (("onnx", 0.9999), ("onnx-int8", 0.97)):
        onnx = load_embedder(str(found), backend, "cpu", 1, str(copy))
        assert onnx.onnx_path.parent == found
        assert (onnx.encode(TEXTS) * embedder.encode(TEXTS)).sum(axis=1).min() >= min_cosine
    assert not list(copy.rglob("*.tmp*")) and find_export("some/other/model", str(copy)) is None


def test_export_model_refuses_a_model_it_cannot_find(tmp_path):
    done = subprocess.run([str(BIN / "tellodb"), "export-model", "--data-dir", str(tmp_path / "d"),
                           "--model", str(tmp_path / "no-such-model")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "embedding.model" in done.stderr and "Traceback" not in done.stderr
