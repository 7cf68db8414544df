"""The node's and the control plane's tuning constants, in one place: sizes, intervals and timeouts
that are not worth a configuration key (those are node.config.ClusterConfig). Each says where it
acts; the module that uses it imports it by name (tests may patch that module's name).

The router's own are in router/tuning.py.
"""

from __future__ import annotations

# ---- Embedding (node.embedder, node.onnx_embedder) ---------------------------------------------------
SMALL_JOB = 8  # texts: a job this small (a query, single ingests) joins any pass whole
ONNX_CHUNK = 32  # at most this many texts per ONNX run
TOKEN_BUDGET = 256  # and at most about this many padded tokens

# ---- Writes (node.writer) ----------------------------------------------------------------------------
COMMIT_ITEMS = 1000  # writes per store-thread turn of the group commit (a larger single request still goes whole)
COMMIT_TEXT_CHARS = 512 * 1024  # and characters of text, so queued queries get their turn between groups

# ---- Indexing behind the writes (node.indexer, node.store_thread, node.store.vector_index) -----------
INDEX_BACKLOG = 128  # unindexed rows that make a shard's Chroma batch worth its fixed cost now
INDEX_IDLE_S = 0.5  # a pause in writes this long indexes every backlog
INDEX_CHUNK = 64  # rows per store call when indexing, so queued queries get their turn between chunks
INDEX_CHUNK_NEAR_SEARCHES = 8  # rows per store call while queries arrive (node/store_thread.py: searches first)
SEARCH_RECENT_S = 1.0  # a search this recent counts as "queries arrive"
SEARCH_GAP_S = 0.1  # an index chunk starts after this long without a search on the node...
INDEX_URGENT = 8192  # ...unless this many rows wait on the node: then chunks take turns with searches
YIELD_POLL_S = 0.002  # how often a waiting index chunk looks again for a gap in the searches
CHROMA_BATCH = 256  # vectors per Chroma upsert

# ---- Search (node.store.search) ----------------------------------------------------------------------
EXACT_SCAN = 2000  # scopes up to this many memories are searched exactly, without Chroma
SHARD_EXACT_SCAN = 16384  # a whole shard up to this many is scanned exactly from its cached matrix (25 MB)
LEXICAL_SCAN = 2000  # lexical matches scored per query and table; candidates beyond it count as 0
NODE_INDEX_ROWS = 200_000  # memories a node's index (node.node_index) holds at most: about 2.7 KiB each
NODE_INDEX_LOAD_ROWS = 8000  # memories loaded into it per query at most (about 0.5 s), one shard at least
NODE_EXACT_SCAN = 2000  # a query spanning at most this many memories of a node scans their vectors exactly

# ---- Free-form ids (node.free_ids) -------------------------------------------------------------------
FREE_ID_RETRIES = 5  # calls to a shard's node that answered NotOwnedError, in all
FREE_ID_BACKOFF_S = 0.05  # before the first retry; doubled each time (0.05 + 0.1 + 0.2 + 0.4 s)

# ---- Shard copies, moves and replication (node.moves, node.replication) ------------------------------
MOVE_SNAPSHOT_CHUNK_BYTES = 4 << 20  # snapshot bytes per Ray call
MOVE_LOG_PAGE = 1000  # changes per Ray call when replaying the source's log
MOVE_INDEX_BATCH = 256  # rows per store-thread call when indexing a received copy (queries run between)
PUSH_PAGE = 1000  # changes per push
CATCH_UP_RETRY_S = 1.0  # between a down follower's catch-up attempts

# ---- Control plane (node.control.health, node.control.failover) --------------------------------------
HEALTH_ASK_TIMEOUT_S = 5.0  # a node that does not report within this counts as not live
STATUS_HISTORY = 50  # failovers, and finished or failed moves, kept for `status`
