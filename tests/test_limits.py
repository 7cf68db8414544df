"""Per-request work limits: refused with 413/422 before any work starts; configured and validated."""

from __future__ import annotations

import pytest

from node.config import ClusterConfig, ConfigError, load_config
from test_api import assert_error, post, uid

LIMITS = ClusterConfig()  # the session cluster runs with the defaults


async def _count(api, entity: str) -> int:
    status, out = await post(api, "/query", {"textual_query": "anything", "entity_id": entity, "limit": 1000})
    assert status == 200, out
    return len(out)


async def test_text_length_limit(api):
    e = uid("limits")
    status, out = await post(api, "/ingest", {"entity_id": e, "textual_content": "a" * LIMITS.max_text_chars})
    assert status == 201, out
    status, out = await post(api, "/ingest", {"entity_id": e, "textual_content": "a" * (LIMITS.max_text_chars + 1)})
    assert_error(status, out, 422, "validation_error")
    assert out["error"]["message"].startswith("textual_content:") and "max_text_chars" in out["error"]["message"]
    items = [{"entity_id": e, "textual_content": "ok"}, {"entity_id": e, "textual_content": "b" * (LIMITS.max_text_chars + 1)}]
    status, out = await post(api, "/ingest/batch", {"items": items})
    assert_error(status, out, 422, "validation_error")
    assert out["error"]["message"].startswith("items.1.textual_content:")
    assert await _count(api, e) == 1  # neither refused request stored anything


async def test_relations_and_metrics_limits(api):
    e = uid("limits")
    rels = [["knows", f"p{i}"] for i in range(LIMITS.max_relations)]
    status, out = await post(api, "/ingest", {"entity_id": e, "textual_content": "t", "relations": rels})
    assert status == 201, out
    status, out = await post(api, "/ingest", {"entity_id": e, "textual_content": "t",
                                              "relations": rels + [["knows", "one-more"]]})
    assert_error(status, out, 422, "validation_error")
    assert "max_relations" in out["error"]["message"]
    metrics = {f"m{i}": i for i in range(LIMITS.max_metrics + 1)}
    status, out = await post(api, "/ingest/batch", {"items": [{"entity_id": e, "textual_content": "t", "metrics": metrics}]})
    assert_error(status, out, 422, "validation_error")
    assert out["error"]["message"].startswith("items.0.metrics:")


async def test_batch_text_bytes_limit(api):
    e = uid("limits")
    per_item = LIMITS.max_text_chars
    n = LIMITS.max_batch_text_bytes // per_item + 1  # legal items, too much text together (still under the body limit)
    items = [{"entity_id": e, "textual_content": "c" * per_item} for _ in range(n)]
    status, out = await post(api, "/ingest/batch", {"items": items})
    assert_error(status, out, 413, "payload_too_large")
    assert "max_batch_text_bytes" in out["error"]["message"]
    # Multi-byte text counts in UTF-8 bytes: one character of "é" is two.
    wide = [{"entity_id": e, "textual_content": "é" * per_item} for _ in range(n // 2 + 1)]
    status, out = await post(api, "/ingest/batch", {"items": wide})
    assert_error(status, out, 413, "payload_too_large")
    assert await _count(api, e) == 0


def test_limits_are_configurable_and_validated(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_text_chars: 1000\nmax_relations: 8\nmax_metrics: 4\nmax_batch_text_bytes: 65536\n")
    c = load_config(f, env={})
    assert (c.max_text_chars, c.max_relations, c.max_metrics, c.max_batch_text_bytes) == (1000, 8, 4, 65536)
    for bad, key in (("max_text_chars: 0", "max_text_chars"), ("max_text_chars: 2000000", "max_text_chars"),
                     ("max_relations: -1", "max_relations"), ("max_metrics: 5000", "max_metrics"),
                     ("max_batch_text_bytes: 20000000", "max_batch_text_bytes")):
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=f"^{key}:"):
            load_config(f, env={})
