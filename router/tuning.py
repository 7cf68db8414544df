"""The router's tuning constants, in one place: timeouts, sizes, intervals and limits that are not
worth a configuration key (those are in node.config.ClusterConfig). Each says where it acts.

The node's and the control plane's are in node/tuning.py.
"""

from __future__ import annotations

# ---- HTTP (router.handlers, router.cli) -----------------------------------------------------
STATS_TIMEOUT_S = 10.0  # GET /stats and GET /profile without an entity: nodes not answering within are null
METRICS_TIMEOUT_S = 2.0  # GET /metrics: a scrape must not hang on a slow node
WALK_EDGES_PER_RESULT = 10  # a graph walk reads at most this many edges per node (or result) it may return
SHUTDOWN_GRACE_S = 20.0  # in-flight requests finish within this after SIGTERM
MCP_MAX_RESULTS = 100  # most memories an MCP tool (recall, profile) returns
RESET_PAGE = 1000  # POST /admin/reset finds the entities left in pages of this many oldest memories

# ---- Keys and abuse (router.access, router.keys) --------------------------------------------
FAILURE_WINDOW_S = 60.0  # wrong keys of a client are counted over this window
FREE_FAILURES = 3  # wrong keys per client and window before each answer is delayed
FIRST_DELAY_S = 0.05  # the first delay; it doubles with each further wrong key
MAX_DELAY_S = 2.0  # and stops growing here
FAILURE_CLIENTS = 10_000  # clients remembered before the quiet ones are forgotten
KEYS_CHECK_S = 1.0  # how often the keys file's mtime is checked (a revoked key stops within this)

# ---- Backups (router.admin, router.backup) --------------------------------------------------
SNAPSHOT_CHUNK_BYTES = 4 << 20  # bytes per Ray call while streaming a shard snapshot
BACKUP_BLOCK_BYTES = 1 << 20  # read size while hashing and copying backup files

# ---- Cluster roles (router.ray_node, router.membership, router.cluster_cli) -----------------
OBJECT_STORE_BYTES = 128 << 20  # shard copies travel in 4 MiB chunks; Ray's default (30% of RAM) is far too much
HEAD_CHECK_EVERY_S = 1.0  # how often a node or router compares the head's cluster id with its own
CLUSTER_POLL_S = 0.5  # `tellodb cluster add-node/remove-node` polls the moves this often
JOIN_WAIT_S = 300.0  # a node or router waits this long for the head (its GCS, the placement authority)
AUTHORITY_CALL_S = 120.0  # a role's calls to the placement authority (placement, join)
NODE_START_S = 900.0  # a node actor's start: opening (and re-indexing) its shards
NODE_CALL_S = 60.0  # a role's other calls to its own node actor
NODE_CLOSE_S = 60.0  # a stopping node's checkpoint of its shards

# ---- Routing and writes (router.routing, router.cluster) -----------------------------------
REJOIN_LOOKUP_WAIT_S = 5.0  # a router joining again waits this long for its actor look-ups to end (router.link)
REJOIN_WAIT_S = 20.0  # a request waits this long (within its timeout) for a router joining the cluster again
DEADLINE_MARGIN_S = 0.5  # a write must reach its commit this long before the router gives up on it

# ---- The audit trail (router.audit) ---------------------------------------------------------
AUDIT_ROTATE_BYTES = 10 << 20  # the audit file rotates at this size
AUDIT_KEEP = 5  # rotated audit files kept
