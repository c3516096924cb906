"""dkv_membership.state: the replicated cluster map of the membership group.

What is checked, in the order of the module docstring: a version per real change and none for
no-ops or rejections; compare-and-set on shard epochs; the leader table never goes back in
time; init once, with a slot table that covers every slot exactly once; malformed commands are
refused (InvalidArgument before proposing, a rejected outcome when applied); snapshot and
restore reproduce the map and its future behaviour; replicas fed the same log are
byte-identical; the change log answers resumable watches; plan_placement keeps the load bound
and the current replicas.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from dkv_membership import state as state_mod
from dkv_membership.placement import capacity
from dkv_membership.state import (
    MembershipStateMachine,
    Outcome,
    plan_placement,
    slot_table,
    validate_command,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dkv.errors import InvalidArgument
from dkv.sharding import SLOT_COUNT, static_shard_for_slot
from dkv.v1 import membership_pb2 as pb

UP, DOWN, LEAVING = pb.NODE_STATE_UP, pb.NODE_STATE_DOWN, pb.NODE_STATE_LEAVING

# -- command builders ---------------------------------------------------------------------------


def register(nid: int, name: str = "", hb: int = 0, zone: str = "", **labels: str) -> bytes:
    node = pb.Node(
        id=nid,
        name=name or f"n{nid}",
        peer_address=f"127.0.0.1:{7000 + nid}",
        client_address=f"127.0.0.1:{8000 + nid}",
        zone=zone,
        labels=labels,
        last_heartbeat_unix_ms=hb,
    )
    return _cmd(register_node=pb.RegisterNodeCommand(node=node))


def heartbeat(nid: int, ms: int) -> bytes:
    return _cmd(heartbeat=pb.HeartbeatCommand(node_id=nid, unix_ms=ms))


def mark_down(nid: int, seen_ms: int) -> bytes:
    return _cmd(mark_down=pb.MarkDownCommand(node_id=nid, last_heartbeat_unix_ms=seen_ms))


def leave(nid: int) -> bytes:
    return _cmd(leave=pb.LeaveCommand(node_id=nid))


def remove(nid: int) -> bytes:
    return _cmd(remove_node=pb.RemoveNodeCommand(node_id=nid))


def set_replicas(
    sid: int, epoch: int, voters: list[int], learners: list[int] | None = None
) -> bytes:
    c = pb.SetShardReplicasCommand(
        shard_id=sid, expected_epoch=epoch, voters=voters, learners=learners or []
    )
    return _cmd(set_shard_replicas=c)


def report(sid: int, leader: int, term: int) -> bytes:
    return _cmd(report_leader=pb.ReportLeaderCommand(shard_id=sid, leader_id=leader, term=term))


def init(n: int, shards: dict[int, list[int]] | None = None) -> bytes:
    given_shards = [pb.Shard(id=s, voters=v) for s, v in (shards or {}).items()]
    return _cmd(init_cluster=pb.InitClusterCommand(shard_count=n, shards=given_shards))


def _cmd(**kw: object) -> bytes:
    return pb.MembershipCommand(**kw).SerializeToString()  # type: ignore[arg-type]


class Replica:
    """A state machine plus the next Raft index, so tests read like a log."""

    def __init__(self, change_log_max: int = state_mod.CHANGE_LOG_MAX) -> None:
        self.sm = MembershipStateMachine(change_log_max)
        self.index = 0

    def __call__(self, data: bytes) -> Outcome:
        self.index += 1
        return self.sm.apply(self.index, data)


def cluster(nodes: int = 3, shards: int = 4) -> Replica:
    r = Replica()
    for i in range(1, nodes + 1):
        assert r(register(i, hb=1000)).changed
    voters = list(range(1, min(nodes, 3) + 1))
    assert r(init(shards, {s: voters for s in range(1, shards + 1)})).accepted
    return r


# -- versioning ---------------------------------------------------------------------------------


def test_every_real_change_bumps_version_by_one_and_noops_do_not() -> None:
    r = Replica()
    steps: list[tuple[bytes, bool]] = [
        (register(1, hb=10), True),
        (register(1, hb=20), False),  # same node again: only the heartbeat time moves
        (register(2), True),
        (heartbeat(1, 30), False),  # UP node: liveness bookkeeping only
        (init(2, {1: [1, 2], 2: [2, 1]}), True),
        (init(2), False),  # rejected: once only
        (set_replicas(1, 1, [1, 2]), False),  # identical sets
        (set_replicas(1, 1, [2, 1]), True),
        (set_replicas(1, 1, [1]), False),  # stale epoch: rejected
        (report(1, 2, 5), True),
        (report(1, 2, 5), False),  # same leader, same term
        (mark_down(2, 0), True),
        (mark_down(2, 0), False),  # already down
        (heartbeat(2, 40), True),  # DOWN -> UP is a change
        (leave(2), True),
        (leave(2), False),
        (register(1, zone="z1"), True),  # zone changed
    ]
    version = 0
    for data, changes in steps:
        out = r(data)
        version += 1 if changes else 0
        assert out.changed is changes, (pb.MembershipCommand.FromString(data), out)
        assert out.version == version == r.sm.version == r.sm.cluster_map().version


def test_heartbeat_time_never_goes_backwards_and_unknown_nodes_must_register() -> None:
    r = Replica()
    r(register(1, hb=100))
    r(heartbeat(1, 50))
    assert r.sm.state.nodes[1].last_heartbeat_unix_ms == 100
    out = r(heartbeat(9, 200))
    assert not out.accepted and "register" in out.reason


def test_mark_down_loses_to_a_newer_heartbeat() -> None:
    r = Replica()
    r(register(1, hb=100))
    r(heartbeat(1, 200))
    out = r(mark_down(1, 100))  # decided on the heartbeat at 100; one at 200 committed since
    assert not out.accepted and "200" in out.reason
    assert r.sm.state.nodes[1].state == UP
    assert r(mark_down(1, 200)).changed
    assert r.sm.state.nodes[1].state == DOWN


def test_registration_conflicts_and_leaving_survives_restart() -> None:
    r = Replica()
    r(register(1, "a"))
    assert "registered as 'a'" in r(register(1, "b")).reason
    assert "registered by node 1" in r(register(2, "a")).reason
    r(leave(1))
    out = r(register(1, "a", zone="new"))  # the draining node restarts
    assert out.changed and out.node is not None and out.node.state == LEAVING


def test_remove_node_needs_leave_and_no_replicas() -> None:
    r = cluster(nodes=4, shards=2)  # node 4 holds nothing, 1..3 hold everything
    assert "leave first" in r(remove(4)).reason
    r(leave(4))
    assert r(remove(4)).changed
    assert 4 not in r.sm.state.nodes
    assert r(remove(4)).accepted  # idempotent
    # A drained and removed node stays out: registering again (it is still running) is
    # refused, also after a snapshot/restore; another name (a new id) is welcome.
    out = r(register(4))
    assert not out.accepted and "drained and removed" in out.reason
    copy = MembershipStateMachine()
    copy.restore(r.sm.snapshot())
    assert copy.state.retired == {4}
    assert r(register(5, name="n4-again")).accepted
    r(leave(3))
    out = r(remove(3))
    assert not out.accepted and "shards [1, 2]" in out.reason


# -- shards: epoch compare-and-set ------------------------------------------------------------


def test_shard_change_requires_expected_epoch_and_bumps_it() -> None:
    r = cluster(nodes=4, shards=2)
    assert r.sm.state.shards[1].epoch == 1
    first = r(set_replicas(1, 1, [1, 2, 3], [4]))
    assert first.accepted and first.shard is not None and first.shard.epoch == 2
    before = r.sm.snapshot()
    # A second decision based on epoch 1 loses and changes nothing; it learns the epoch.
    lost = r(set_replicas(1, 1, [1, 2, 4]))
    assert not lost.accepted and "stale epoch" in lost.reason
    assert lost.shard is not None and lost.shard.epoch == 2
    assert r.sm.snapshot() == before
    assert r(set_replicas(1, 2, [1, 2, 4])).changed
    assert list(r.sm.state.shards[1].voters) == [1, 2, 4]
    assert r.sm.state.shards[1].epoch == 3
    assert r.sm.state.shards[2].epoch == 1  # other shards untouched


def test_new_replicas_only_on_known_up_nodes() -> None:
    r = cluster(nodes=5, shards=1)
    assert "unknown node 9" in r(set_replicas(1, 1, [1, 2, 9])).reason
    r(mark_down(4, 1000))
    r(leave(5))
    assert "NODE_STATE_DOWN" in r(set_replicas(1, 1, [1, 2, 4])).reason
    assert "NODE_STATE_LEAVING" in r(set_replicas(1, 1, [1, 2], [5])).reason
    assert "unknown shard" in r(set_replicas(7, 1, [1])).reason
    # A down node that already is a replica may stay one (the shard serves from the majority).
    r(mark_down(3, 1000))
    assert r(set_replicas(1, 1, [3, 2, 1])).changed


# -- leaders: the term rule ---------------------------------------------------------------------


def test_leader_reports_never_go_back_in_time() -> None:
    r = cluster(nodes=3, shards=2)
    assert r(report(1, 1, 3)).changed
    stale = r(report(1, 2, 2))
    assert not stale.accepted and "term 2 < 3" in stale.reason
    assert stale.leader is not None and stale.leader.leader_id == 1
    assert not r(report(1, 1, 3)).changed  # repeated report: no-op
    conflict = r(report(1, 2, 3))  # two leaders in one term cannot both be right
    assert not conflict.accepted and "already has leader 1" in conflict.reason
    assert r(report(1, 2, 4)).changed
    assert r.sm.state.leaders[1] == pb.LeaderEntry(shard_id=1, leader_id=2, term=4)
    assert r(report(2, 3, 1)).changed  # terms are per shard
    assert "unknown shard" in r(report(9, 1, 1)).reason
    assert "unknown node" in r(report(1, 9, 9)).reason


# -- init and the slot table ------------------------------------------------------------------


def test_init_is_accepted_once() -> None:
    r = cluster(nodes=3, shards=4)
    snap = r.sm.snapshot()
    out = r(init(8))
    assert not out.accepted and "already initialized with 4 shards" in out.reason
    assert r.sm.snapshot() == snap
    assert sorted(r.sm.state.shards) == [1, 2, 3, 4]
    assert all(s.epoch == 1 and list(s.voters) == [1, 2, 3] for s in r.sm.state.shards.values())


def test_init_without_replicas_and_with_unknown_nodes() -> None:
    r = Replica()
    assert "unknown node 1" in r(init(2, {1: [1]})).reason
    assert r(init(2)).changed
    assert all(not s.voters for s in r.sm.state.shards.values())


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 10, 64, 100, 1000, SLOT_COUNT])
def test_slot_table_covers_every_slot_exactly_once(shards: int) -> None:
    ranges = slot_table(shards)
    owner = [s for r in ranges for s in [r.shard_id] * (r.end - r.start)]
    assert len(owner) == SLOT_COUNT  # no gap, no overlap: ranges are contiguous from 0
    assert ranges[0].start == 0 and ranges[-1].end == SLOT_COUNT
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    assert all(owner[slot] == static_shard_for_slot(slot, shards) for slot in range(SLOT_COUNT))
    sizes = Counter(owner)
    assert sorted(sizes) == list(range(1, shards + 1))  # one range per shard, all present
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_init_installs_the_slot_table() -> None:
    r = cluster(nodes=3, shards=5)
    assert list(r.sm.cluster_map().slot_ranges) == slot_table(5)


# -- malformed commands -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xff", "does not decode"),
        (b"", "empty membership command"),
        (register(0), "node id must be >= 1"),
        (_cmd(register_node=pb.RegisterNodeCommand(node=pb.Node(id=1))), "name is required"),
        (
            _cmd(register_node=pb.RegisterNodeCommand(node=pb.Node(id=1, name="a"))),
            "peer_address and client_address",
        ),
        (heartbeat(0, 1), "node id must be >= 1"),
        (set_replicas(1, 1, []), "at least one voter"),
        (set_replicas(1, 1, [1, 1]), "duplicate node in voters"),
        (set_replicas(1, 1, [1, 2], [2]), "both voter and learner"),
        (set_replicas(0, 1, [1]), "shard id must be >= 1"),
        (report(1, 1, 0), "term must be >= 1"),
        (init(0), "shard count must be in"),
        (init(SLOT_COUNT + 1), "shard count must be in"),
        (init(2, {3: [1]}), "outside 1..2"),
    ],
)
def test_malformed_commands(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_command(state_mod.decode_command(data))
    # Applied from the log, the same command is refused without raising or changing anything.
    r = Replica()
    out = r(data)
    assert not out.accepted and message in out.reason and r.sm.version == 0


def test_restore_rejects_garbage() -> None:
    with pytest.raises(InvalidArgument, match="snapshot does not decode"):
        MembershipStateMachine().restore(b"\xff\xff")


# -- snapshots and determinism ------------------------------------------------------------------

node_ids = st.integers(1, 6)
commands = st.one_of(
    st.builds(register, node_ids, st.just(""), st.integers(0, 50), st.sampled_from(["", "a"])),
    st.builds(heartbeat, node_ids, st.integers(0, 100)),
    st.builds(mark_down, node_ids, st.integers(0, 100)),
    st.builds(leave, node_ids),
    st.builds(remove, node_ids),
    st.builds(
        set_replicas,
        st.integers(1, 4),
        st.integers(0, 4),
        st.lists(node_ids, min_size=1, max_size=3, unique=True),
    ),
    st.builds(report, st.integers(1, 4), node_ids, st.integers(1, 6)),
    st.builds(init, st.integers(1, 4)),
    st.binary(max_size=4),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(commands, max_size=40), st.lists(commands, max_size=20))
def test_snapshot_restore_gives_same_map_and_same_future(
    prefix: list[bytes], suffix: list[bytes]
) -> None:
    a = Replica(change_log_max=8)
    for data in prefix:
        a(data)
    b = Replica(change_log_max=8)
    b.sm.restore(a.sm.snapshot())
    assert b.sm.cluster_map() == a.sm.cluster_map()
    assert b.sm.snapshot() == a.sm.snapshot()
    for data in suffix:
        assert a(data) == b(data)
    assert b.sm.snapshot() == a.sm.snapshot()
    for v in range(a.sm.version + 2):
        assert a.sm.changes_since(v) == b.sm.changes_since(v)


@settings(max_examples=40, deadline=None)
@given(st.lists(commands, max_size=60))
def test_replicas_fed_the_same_log_are_byte_identical(log: list[bytes]) -> None:
    a, b = Replica(), Replica()
    outs_a = [a(d) for d in log]
    outs_b = [b(d) for d in log]
    assert outs_a == outs_b
    assert a.sm.snapshot() == b.sm.snapshot()
    # The version counts exactly the changes.
    assert a.sm.version == sum(o.changed for o in outs_a)
    assert all(not o.changed for o in outs_a if not o.accepted)


def test_snapshot_is_canonical_whatever_the_insertion_order() -> None:
    a, b = Replica(), Replica()
    a(register(1, x="1", y="2"))
    a(register(2))
    b(register(2))
    b(register(1, y="2", x="1"))
    # Same nodes, different order of registration: same map (not the same change log).
    assert a.sm.cluster_map() == b.sm.cluster_map()
    assert a.sm.cluster_map().SerializeToString(
        deterministic=True
    ) == b.sm.cluster_map().SerializeToString(deterministic=True)


# -- the change log -----------------------------------------------------------------------------


def test_changes_since_recent_versions() -> None:
    r = Replica(change_log_max=4)
    r(register(1))  # v1
    r(register(2))  # v2
    r(init(2, {1: [1], 2: [2]}))  # v3
    r(report(2, 2, 1))  # v4
    r(set_replicas(1, 1, [1, 2]))  # v5
    assert r.sm.changes_since(5) == []
    changes = r.sm.changes_since(2)
    assert changes is not None
    assert [c.version for c in changes] == [3, 4, 5]
    assert changes[0].slots and list(changes[0].shard_ids) == [1, 2]
    assert list(changes[1].leader_shard_ids) == [2] and not changes[1].slots
    assert list(changes[2].shard_ids) == [1]
    first = r.sm.changes_since(1)
    assert first is not None and [c.version for c in first] == [2, 3, 4, 5]
    assert list(first[0].node_ids) == [2]


def test_changes_since_too_old_or_unknown_version_means_resend() -> None:
    r = Replica(change_log_max=4)
    for i in range(1, 7):
        r(register(i))  # v1..v6; the log keeps v3..v6
    assert r.sm.changes_since(0) is None
    assert r.sm.changes_since(1) is None
    kept = r.sm.changes_since(2)
    assert kept is not None and [c.version for c in kept] == [3, 4, 5, 6]
    assert r.sm.changes_since(7) is None  # from the future: another history
    assert Replica().sm.changes_since(0) == []


def test_change_log_max_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        MembershipStateMachine(change_log_max=0)


# -- placement plan -----------------------------------------------------------------------------


def moves(before: dict[int, tuple[int, ...]], after: dict[int, tuple[int, ...]]) -> int:
    """Replicas ``after`` puts on a node that did not hold that shard (placement.moves, by id)."""
    return sum(len(set(ids) - set(before.get(s, ()))) for s, ids in after.items())


def apply_plan(r: Replica, plan: dict[int, tuple[int, ...]]) -> None:
    for sid, voters in plan.items():
        out = r(set_replicas(sid, r.sm.state.shards[sid].epoch, list(voters)))
        assert out.accepted, out.reason


def test_plan_placement_respects_the_bound_and_keeps_replicas() -> None:
    shards, eps = 32, 0.25
    r = Replica()
    for i in range(1, 6):
        r(register(i))
    r(init(shards))
    plan = plan_placement(r.sm.state, replication=3, epsilon=eps)
    assert sorted(plan) == list(range(1, shards + 1))
    assert all(len(set(v)) == 3 for v in plan.values())
    cap = capacity(shards * 3, 5, eps)
    assert max(Counter(n for v in plan.values() for n in v).values()) <= cap
    apply_plan(r, plan)
    # Fed back, the plan is a fixed point: nothing to move.
    assert plan_placement(r.sm.state, 3, eps) == plan
    # A sixth node takes about its share; the rest stays where it is.
    r(register(6))
    grown = plan_placement(r.sm.state, 3, eps)
    moved = moves(plan, grown)
    assert 0 < moved <= shards * 3 // 6 + 6
    assert max(Counter(n for v in grown.values() for n in v).values()) <= capacity(
        shards * 3, 6, eps
    )
    apply_plan(r, grown)
    # A node that goes down: only its replicas move.
    held = sum(3 in v for v in grown.values())
    r(mark_down(3, 0))
    healed = plan_placement(r.sm.state, 3, eps)
    assert all(3 not in v for v in healed.values())
    assert moves(grown, healed) == held


def test_plan_placement_before_init_and_with_too_few_nodes() -> None:
    r = Replica()
    r(register(1))
    r(register(2))
    assert plan_placement(r.sm.state) == {}
    r(init(2))
    with pytest.raises(InvalidArgument, match="needs at least 3 nodes"):
        plan_placement(r.sm.state, replication=3)
    assert all(len(v) == 2 for v in plan_placement(r.sm.state, replication=2).values())


def test_plan_placement_uses_zones() -> None:
    r = Replica()
    for i in range(1, 7):
        r(register(i, zone=f"z{i % 3}"))
    r(init(8))
    zone = {n.id: n.zone for n in r.sm.state.nodes.values()}
    for voters in plan_placement(r.sm.state).values():
        assert len({zone[n] for n in voters}) == 3
