"""Per-request work limits (docs/guide/limits.md), checked before a request reaches a node.

The schemas hold only hard ceilings; the configured limits (`max_text_chars`, `max_relations`,
`max_metrics`, `max_batch_text_bytes`) bound what one request can make a node's threads do, so an
oversized request is refused up front (422 per field, 413 for the request's total text) instead of
holding a node.
"""

from __future__ import annotations

from node.config import ClusterConfig
from router.errors import PayloadTooLarge, ValidationFailed
from router.schemas import IngestRequest


def check_ingest(config: ClusterConfig, requests: list[IngestRequest], prefix: str = "") -> None:
    """Raise ValidationFailed naming the first field over its limit, or PayloadTooLarge when the
    texts together exceed `max_batch_text_bytes`. `prefix` is `items.` for a batch."""
    total = 0
    for i, req in enumerate(requests):
        where = f"{prefix}{i}." if prefix else ""
        if len(req.textual_content) > config.max_text_chars:
            raise ValidationFailed(f"{where}textual_content: {len(req.textual_content)} characters exceed the limit "
                                   f"of {config.max_text_chars} (max_text_chars)")
        if req.relations and len(req.relations) > config.max_relations:
            raise ValidationFailed(f"{where}relations: {len(req.relations)} relations exceed the limit of "
                                   f"{config.max_relations} (max_relations)")
        if req.metrics and len(req.metrics) > config.max_metrics:
            raise ValidationFailed(f"{where}metrics: {len(req.metrics)} metrics exceed the limit of "
                                   f"{config.max_metrics} (max_metrics)")
        total += len(req.textual_content.encode("utf-8"))
    if total > config.max_batch_text_bytes:
        raise PayloadTooLarge(f"the request's texts total {total} UTF-8 bytes, over the limit of "
                              f"{config.max_batch_text_bytes} (max_batch_text_bytes)")
