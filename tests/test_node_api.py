"""Ray exposes a node's public API and nothing else: its helpers are not callable from outside."""

from __future__ import annotations

import inspect

from node.actor import API, ExposedNode, NodeActor
from node.service import Node


def exposed() -> set[str]:
    return {m for m in NodeActor.__ray_metadata__.method_meta.methods if not m.startswith("__")}


def test_ray_exposes_exactly_the_public_api():
    helpers = {n for n, _ in inspect.getmembers(Node, inspect.isfunction) if n.startswith("_") and not n.startswith("__")}
    assert helpers, "Node has private helpers to hide"
    assert exposed() == set(API)
    assert not exposed() & helpers


def test_each_exposed_method_keeps_the_node_signature():
    for name in API:
        method = getattr(ExposedNode, name)
        params = [p for p in inspect.signature(method).parameters.values() if p.name != "_ray_trace_ctx"]  # Ray's own
        assert params == list(inspect.signature(getattr(Node, name)).parameters.values()), name
        assert inspect.iscoroutinefunction(method), name
