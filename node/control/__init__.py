"""The control plane: where shards live and how that changes, apart from the nodes' data plane.

placement (the Placement type and the ring), placement_file (placement.json and the nodes' copies),
authority (the one record, members, recovery, status), rebalance (the move driver), failover (who
answers, who takes over a primary), autobalance (when data moves without a command, and how fast),
health (replication health for the status), actor (the authority as a Ray actor). The data plane
(node.service and its parts) imports from here only the placement types; nothing here imports the
data plane.
"""
