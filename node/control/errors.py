"""The placement authority's refusals, each mapped to its HTTP status by the router (router.control_client)."""

from __future__ import annotations

from node.errors import NodeError


class PlacementError(NodeError):
    """A request to change the cluster that cannot be done as asked (the router answers 409)."""


class UnknownNode(PlacementError):
    """A node name that is not part of the cluster (the router answers 404)."""


class NotReady(PlacementError):
    """The authority cannot change the cluster yet (the router answers 503 with the reason)."""
