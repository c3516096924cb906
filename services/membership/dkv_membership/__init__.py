"""The membership service: nodes, shards, slots, placement and leaders (DESIGN.md)."""
