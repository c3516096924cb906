"""A shard's health as read from the cluster map: one definition for every place that reports it.

Membership's ``dkv_membership_shards{health}``, the gateway's Cluster.Status and ``dkvctl
status`` all classify a shard the same way, so the dashboard and the command line agree:

- ``no_leader``: the map names no leader for the shard, or the node it names is not UP
  (a DOWN leader's shard takes writes again only after an election reported a new one);
- ``under_replicated``: a leader is known but a voter's node is not UP, or the shard has
  fewer voters than the replication factor (when the caller knows it: membership does;
  capped at the number of nodes, as placement cannot do better). Learners catching up
  during a move do not count: the voters are still all there;
- ``healthy``: otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from dkv.v1 import membership_pb2 as mpb

__all__ = ["ShardHealth", "shard_health", "health_counts"]


class ShardHealth(enum.StrEnum):
    HEALTHY = "healthy"
    UNDER_REPLICATED = "under_replicated"
    NO_LEADER = "no_leader"


def shard_health(
    shard: mpb.Shard,
    nodes: Mapping[int, mpb.Node],
    leaders: Mapping[int, mpb.LeaderEntry],
    replication: int | None = None,
) -> ShardHealth:
    def up(node_id: int) -> bool:
        n = nodes.get(node_id)
        return n is not None and n.state == mpb.NODE_STATE_UP

    entry = leaders.get(shard.id)
    if entry is None or entry.leader_id == 0 or not up(entry.leader_id):
        return ShardHealth.NO_LEADER
    if not all(up(v) for v in shard.voters):
        return ShardHealth.UNDER_REPLICATED
    if replication is not None and len(shard.voters) < min(replication, len(nodes)):
        return ShardHealth.UNDER_REPLICATED
    return ShardHealth.HEALTHY


def health_counts(
    shards: Mapping[int, mpb.Shard],
    nodes: Mapping[int, mpb.Node],
    leaders: Mapping[int, mpb.LeaderEntry],
    replication: int | None = None,
) -> dict[ShardHealth, int]:
    """How many shards are in each state; every state is present (0 when none)."""
    out = dict.fromkeys(ShardHealth, 0)
    for s in shards.values():
        out[shard_health(s, nodes, leaders, replication)] += 1
    return out
