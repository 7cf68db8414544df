"""Prometheus metrics of one router, in a registry of its own (so apps in tests do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CACHE_RESULTS = (("hit", "hits"), ("miss", "misses"))  # an embedding cache metric's label, its stats key


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ... of the router
        self.ingest_total = Counter("tellodb_ingest", "Memories ingested (acknowledged writes).", registry=r)
        self.query_total = Counter("tellodb_query", "Queries answered.", registry=r)
        self.query_duration = Histogram(
            "tellodb_query_duration_seconds", "End-to-end query latency in the router.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(
            "tellodb_http_requests", "HTTP requests by route, method and status.",
            ["route", "method", "status"], registry=r)
        self.request_duration = Histogram(
            "tellodb_http_request_duration_seconds", "HTTP request latency by route, method and status.",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.node_memories = Gauge("tellodb_node_memories", "Memories stored per node.", ["node"], registry=r)
        self.node_shards = Gauge("tellodb_node_shards", "Shards owned per node.", ["node"], registry=r)
        self.node_entities = Gauge("tellodb_node_entities", "Entities stored per node.", ["node"], registry=r)
        self.node_unindexed = Gauge(
            "tellodb_node_unindexed", "Memories committed to SQLite but not yet in Chroma.", ["node"], registry=r)
        self.node_busy = Gauge(
            "tellodb_node_busy_seconds", "Seconds a node's worker threads have spent per phase since it started "
            "(embed, commit, index, search); its rate is the share of a core each phase takes.",
            ["node", "phase"], registry=r)
        self.node_facts = Gauge("tellodb_node_facts", "Facts per node, current or stale.", ["node", "state"],
                                registry=r)
        self.node_edges = Gauge("tellodb_node_edges", "Knowledge-graph edges per node.", ["node"], registry=r)
        self.node_measurements = Gauge("tellodb_node_measurements", "Numeric measurements per node.", ["node"],
                                       registry=r)
        self.node_up = Gauge("tellodb_node_up", "1 when the node answered the last scrape.", ["node"], registry=r)
        self.node_bytes = Gauge("tellodb_node_bytes", "Bytes on disk of a node's shards.", ["node"], registry=r)
        self.node_memory = Gauge("tellodb_node_memory_bytes", "A node process's own (anonymous) memory.", ["node"],
                                 registry=r)
        self.node_index_memory = Gauge(
            "tellodb_node_index_memory_bytes", "Estimated memory of a node's loaded HNSW indexes (index_memory_mb "
            "caps it).", ["node"], registry=r)
        self.node_index_loads = Gauge(
            "tellodb_node_index_loads", "Shard indexes a node loaded since it started; a steady rise means the "
            "index_memory_mb budget is smaller than the shards in use.", ["node"], registry=r)
        self.node_spanning_memory = Gauge(
            "tellodb_node_spanning_index_bytes", "Memory of a node's index over its shards for queries without an "
            "entity (node/node_index.py: postings, 8-bit vectors, 4-bit scans and the rows scoring reads).", ["node"],
            registry=r)
        self.node_embedding_passes = Gauge(
            "tellodb_node_embedding_passes", "Model passes a node has made since it started (a pass embeds a batch).",
            ["node"], registry=r)
        self.node_embedding_cache = Gauge(
            "tellodb_node_embedding_cache", "Query texts a node found in its embedding cache (hit) or embedded "
            "(miss) since it started.", ["node", "result"], registry=r)
        self.router_embedding_passes = Gauge(
            "tellodb_router_embedding_passes", "Model passes this router has made embedding queries that span "
            "nodes (router/query_embedder.py; 0 where nodes embed them).", registry=r)
        self.router_embedding_cache = Gauge(
            "tellodb_router_embedding_cache", "Query texts this router found in its embedding cache (hit) or "
            "embedded (miss).", ["result"], registry=r)
        self.placement_epoch = Gauge("tellodb_placement_epoch", "The placement's epoch (it grows with every "
                                     "member change and shard move).", registry=r)
        self.pending_moves = Gauge("tellodb_shard_moves_pending", "Shard copies not where the balanced placement puts them yet.", registry=r)
        self.moved_shards = Gauge("tellodb_shards_moved", "Shards moved since the placement authority started.",
                                  registry=r)
        self.move_failed = Gauge("tellodb_shard_move_failed", "1 while the last rebalance stopped on an error.",
                                 registry=r)
        self.moved_retries = Gauge("tellodb_moved_retries", "Requests this router sent again because a node said "
                                   "the shard moved.", registry=r)
        self.copies_down = Gauge("tellodb_replica_copies_down", "Follower copies a node (their primary) is not "
                                 "replicating to: their shards are under-replicated.", ["node"], registry=r)
        self.replication_lag = Gauge("tellodb_replication_lag_max", "Changes the furthest-behind follower of a "
                                     "node's primaries has not applied yet.", ["node"], registry=r)
        self.failovers = Gauge("tellodb_failovers", "Shards whose primary was handed to a follower since the "
                               "placement authority started.", registry=r)
        self.nodes_down = Gauge("tellodb_nodes_down", "Joined nodes not answering the authority's pings.",
                                registry=r)
        self.authority_up = Gauge("tellodb_authority_up", "1 when this router reached the placement authority at "
                                  "its last check (0: the head is away; moves and member changes wait).", registry=r)
        self.router_ready = Gauge("tellodb_router_ready", "1 when this router can route requests now (/ready).",
                                  registry=r)
        self.rejoins = Counter("tellodb_ray_rejoins", "Times this router joined the Ray cluster again after losing "
                               "it (a head back without GCS fault tolerance).", registry=r)
        self.nodes_rejoining = Gauge("tellodb_cluster_nodes_rejoining", "Nodes of the placement that have not "
                                     "joined the authority since it started (a cluster rejoin in progress).",
                                     registry=r)
        self._rejoins_seen = 0
        self.key_requests = Counter("tellodb_key_requests", "Requests by API key name (never the key) and outcome "
                                    "(ok, forbidden, rate_limited).", ["key", "outcome"], registry=r)
        self.auth_failures = Counter("tellodb_auth_failures", "Requests with a missing or wrong key.", registry=r)
        self.audit_events = Counter("tellodb_audit_events", "Audit-trail entries by action.", ["action"], registry=r)

    def observe_nodes(self, stats: dict[str, dict | None]) -> None:
        for node, s in stats.items():
            self.node_up.labels(node).set(0 if s is None else 1)
            if s is not None:
                self.node_memories.labels(node).set(s["memories"])
                self.node_shards.labels(node).set(s["shards_owned"])
                self.node_entities.labels(node).set(s["entities"])
                self.node_unindexed.labels(node).set(s["unindexed"])
                self.node_facts.labels(node, "current").set(s["facts_current"])
                self.node_facts.labels(node, "stale").set(s["facts_stale"])
                self.node_edges.labels(node).set(s["edges"])
                self.node_measurements.labels(node).set(s["measurements"])
                self.node_bytes.labels(node).set(s.get("bytes", 0))
                if s.get("memory_bytes") is not None:
                    self.node_memory.labels(node).set(s["memory_bytes"])
                indexes = s.get("vector_indexes") or {}
                self.node_index_memory.labels(node).set(indexes.get("mb", 0) * 2**20)
                self.node_index_loads.labels(node).set(indexes.get("loads", 0))
                spanning = s.get("node_index") or {}
                self.node_spanning_memory.labels(node).set(
                    (spanning.get("lexicon_mb", 0) + spanning.get("vectors_mb", 0) + spanning.get("rows_mb", 0)) * 2**20)
                replication = s.get("replication") or {}
                self.copies_down.labels(node).set(replication.get("followers_down", 0))
                self.replication_lag.labels(node).set(replication.get("lag_max", 0))
                self.node_embedding_passes.labels(node).set(s["embedder_passes"])
                for result, key in CACHE_RESULTS:
                    self.node_embedding_cache.labels(node, result).set(s["embedding_cache"][key])
                for phase, seconds in s["busy_seconds"].items():
                    self.node_busy.labels(node, phase).set(seconds)

    def observe_router_embedding(self, stats: dict) -> None:
        self.router_embedding_passes.set(stats["embedder_passes"])
        for result, key in CACHE_RESULTS:
            self.router_embedding_cache.labels(result).set(stats["embedding_cache"][key])

    def observe_membership(self, ready: bool, authority_up: bool, rejoins: int) -> None:
        self.router_ready.set(1 if ready else 0)
        self.authority_up.set(1 if authority_up else 0)
        if rejoins > self._rejoins_seen:
            self.rejoins.inc(rejoins - self._rejoins_seen)
            self._rejoins_seen = rejoins

    def observe_placement(self, summary: dict | None, moved_retries: int) -> None:
        self.moved_retries.set(moved_retries)
        if summary is not None:
            self.nodes_rejoining.set(len(summary.get("rejoining", ())))
            self.placement_epoch.set(summary["epoch"])
            self.pending_moves.set(summary["pending_moves"])
            self.moved_shards.set(summary["moved_shards"])
            self.move_failed.set(1 if summary["error"] and not summary["rebalancing"] else 0)
            self.failovers.set(summary.get("failovers", 0))
            self.nodes_down.set(len(summary.get("down", ())))

    def render(self) -> bytes:
        return generate_latest(self.registry)
