"""The ONNX Runtime path: exported offline from the local model, cached, and equal to torch's vectors."""

import numpy as np
import pytest

from node.config import DEFAULT_MODEL, resolve_model_path
from node.embedder import load_embedder
from node.onnx_embedder import export_onnx, onnx_cache_dir

TEXTS = ["User prefers dark mode and uses a screen reader", "Caroline: I went to the LGBTQ support group",
         "短い文", "a much longer sentence " * 40]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx-data"))


@pytest.mark.parametrize("backend, min_cosine", [("onnx", 0.9999), ("onnx-int8", 0.97)])
def test_onnx_vectors_match_sentence_transformers(embedder, data_dir, backend, min_cosine):
    onnx = load_embedder(resolve_model_path(DEFAULT_MODEL), backend, "cpu", 1, data_dir)
    assert onnx.dimension == embedder.dimension
    got, want = onnx.encode(TEXTS), embedder.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * want).sum(axis=1).min() >= min_cosine
    assert onnx.encode([]).shape == (0, embedder.dimension)


def test_export_is_cached_per_data_dir(data_dir):
    model = resolve_model_path(DEFAULT_MODEL)
    path = export_onnx(model, data_dir, "onnx")
    stamp = path.stat().st_mtime_ns
    assert export_onnx(model, data_dir, "onnx") == path and path.stat().st_mtime_ns == stamp
    assert path.parent == onnx_cache_dir(model, data_dir)
    assert not list(path.parent.glob("*.tmp.onnx"))

