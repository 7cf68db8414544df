"""The Ray names of the cluster's actors, in a module of their own (it imports nothing), so that
the node, the authority and the router can all name each other without importing each other."""

NAMESPACE = "tellodb"
AUTHORITY_NAME = "tellodb-placement"


def actor_name(node: str) -> str:
    """The Ray actor name of node `node` in NAMESPACE."""
    return f"{NAMESPACE}-{node}"
