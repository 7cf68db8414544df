"""tellodb-cluster data plane: shards (SQLite + Chroma), the embedder and the node actor."""
