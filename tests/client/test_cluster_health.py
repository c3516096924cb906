"""Shard health from the cluster map (dkv.cluster_health) and dkvctl status's reading of a
gateway's Cluster.Status answer: the same classification membership's metrics use."""

from __future__ import annotations

import pytest
import typer

from dkv.cli.dkvctl import Opts, _cluster_rows, _print_cluster_status
from dkv.cluster_health import ShardHealth, health_counts, shard_health
from dkv.v1 import admin_pb2, cluster_pb2
from dkv.v1 import membership_pb2 as mpb

UP, DOWN = mpb.NODE_STATE_UP, mpb.NODE_STATE_DOWN


def _map(
    states: dict[int, int], shards: dict[int, list[int]], leaders: dict[int, int]
) -> mpb.ClusterMap:
    m = mpb.ClusterMap(version=7)
    for i, st in states.items():
        m.nodes.add(id=i, name=f"n{i}", client_address=f"127.0.0.1:{2400 + i}", state=st)
    for sid, voters in shards.items():
        m.shards.add(id=sid, epoch=1, voters=voters)
    for sid, lid in leaders.items():
        m.leaders.add(shard_id=sid, leader_id=lid, term=3)
    return m


def _classify(m: mpb.ClusterMap, replication: int | None = None) -> dict[int, ShardHealth]:
    nodes = {n.id: n for n in m.nodes}
    leaders = {e.shard_id: e for e in m.leaders}
    return {s.id: shard_health(s, nodes, leaders, replication) for s in m.shards}


def test_shard_health_classification() -> None:
    m = _map(
        {1: UP, 2: UP, 3: DOWN},
        {1: [1, 2], 2: [1, 3], 3: [3, 1], 4: [1, 2]},
        {1: 1, 2: 1, 3: 3},  # shard 3's leader is DOWN, shard 4 reported none
    )
    assert _classify(m) == {
        1: ShardHealth.HEALTHY,
        2: ShardHealth.UNDER_REPLICATED,
        3: ShardHealth.NO_LEADER,
        4: ShardHealth.NO_LEADER,
    }
    # Knowing the replication factor, two voters of three is under-replicated too.
    assert _classify(m, replication=3)[1] is ShardHealth.UNDER_REPLICATED
    nodes = {n.id: n for n in m.nodes}
    counts = health_counts({s.id: s for s in m.shards}, nodes, {e.shard_id: e for e in m.leaders})
    assert counts == {
        ShardHealth.HEALTHY: 1,
        ShardHealth.UNDER_REPLICATED: 1,
        ShardHealth.NO_LEADER: 2,
    }
    assert health_counts({}, nodes, {}) == dict.fromkeys(ShardHealth, 0)


def _status(node_id: int, leads: list[int]) -> admin_pb2.StatusResponse:
    st = admin_pb2.StatusResponse(member_id=node_id, name=f"n{node_id}", db_size_bytes=4096)
    for sid in leads:
        st.shards.add(
            shard_id=sid,
            role=admin_pb2.ROLE_LEADER,
            term=3,
            commit_index=10 + sid,
            applied_index=9 + sid,
        )
    return st


def test_dkvctl_reads_a_cluster_status_answer(capsys: pytest.CaptureFixture[str]) -> None:
    healthy = cluster_pb2.ClusterStatusResponse(
        map=_map({1: UP, 2: UP}, {1: [1, 2], 2: [2, 1]}, {1: 1, 2: 2}), map_age_ms=1500
    )
    healthy.nodes.add(node_id=1, status=_status(1, [1]))
    healthy.nodes.add(node_id=2, status=_status(2, [2]))
    nodes, shards, problems = _cluster_rows(healthy)
    assert problems == []
    assert [(n["name"], n["state"], n["leads"]) for n in nodes] == [
        ("n1", "up", 1),
        ("n2", "up", 1),
    ]
    assert [(s["shard"], s["health"], s["leader"], s["commit"]) for s in shards] == [
        (1, "healthy", "1", 11),
        (2, "healthy", "2", 12),
    ]
    _print_cluster_status(Opts(["x"], "table", 1.0, None), healthy)  # exit 0: no raise
    assert "2 nodes (2 up, 0 down, 0 leaving), 2 shards (2 healthy" in capsys.readouterr().out

    # Node 2 went DOWN and does not answer: its shard has no leader, the other is short of a
    # voter, and the command says so on stderr with exit code 1.
    sick = cluster_pb2.ClusterStatusResponse(
        map=_map({1: UP, 2: DOWN}, {1: [1, 2], 2: [2, 1]}, {1: 1, 2: 2})
    )
    sick.nodes.add(node_id=1, status=_status(1, [1]))
    sick.nodes.add(node_id=2, error="127.0.0.1:2402: UNAVAILABLE: connection refused")
    nodes, shards, problems = _cluster_rows(sick)
    assert [s["health"] for s in shards] == ["under_replicated", "no_leader"]
    assert shards[1]["commit"] == "-"
    assert problems == [
        "node n2 (2): 127.0.0.1:2402: UNAVAILABLE: connection refused",
        "shard 1: under replicated",
        "shard 2: no leader",
    ]
    with pytest.raises(typer.Exit) as exit_info:
        _print_cluster_status(Opts(["x"], "json", 1.0, None), sick)
    assert exit_info.value.exit_code == 1
    captured = capsys.readouterr()
    assert "Error: shard 2: no leader" in captured.err
    assert '"no_leader": 1' in captured.out
