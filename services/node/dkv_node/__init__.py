"""The storage node: the KV state machine of a shard and the node's servers."""
