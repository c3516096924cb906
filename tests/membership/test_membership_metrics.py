"""``dkv_membership_*`` classify a map's nodes and shards: every label value always present."""

from __future__ import annotations

from dkv_membership.metrics import MembershipCollector
from dkv_membership.state import MembershipState
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dkv.v1 import membership_pb2 as pb


def test_nodes_by_state_and_shards_by_health() -> None:
    st = MembershipState(version=42)
    st.nodes = {
        1: pb.Node(id=1, state=pb.NODE_STATE_UP),
        2: pb.Node(id=2, state=pb.NODE_STATE_UP),
        3: pb.Node(id=3, state=pb.NODE_STATE_DOWN),
        4: pb.Node(id=4, state=pb.NODE_STATE_UP),
    }
    st.shards = {
        1: pb.Shard(id=1, voters=[1, 2, 4]),  # healthy
        2: pb.Shard(id=2, voters=[1, 2, 3]),  # a voter is down
        3: pb.Shard(id=3, voters=[1, 2, 4]),  # no leader reported
        4: pb.Shard(id=4, voters=[1, 2], learners=[4]),  # a learner catching up
    }
    st.leaders = {
        1: pb.LeaderEntry(shard_id=1, leader_id=1, term=3),
        2: pb.LeaderEntry(shard_id=2, leader_id=2, term=3),
        4: pb.LeaderEntry(shard_id=4, leader_id=1, term=3),
    }
    registry = CollectorRegistry()
    MembershipCollector(lambda: st, lambda: None, 3, registry)
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    assert got[("dkv_membership_nodes", (("state", "up"),))] == 3
    assert got[("dkv_membership_nodes", (("state", "down"),))] == 1
    assert got[("dkv_membership_nodes", (("state", "leaving"),))] == 0
    assert got[("dkv_membership_shards", (("health", "healthy"),))] == 1
    assert got[("dkv_membership_shards", (("health", "under_replicated"),))] == 2
    assert got[("dkv_membership_shards", (("health", "no_leader"),))] == 1
    assert got[("dkv_membership_map_version", ())] == 42
    assert got[("dkv_membership_placement_moves_in_flight", ())] == 0
