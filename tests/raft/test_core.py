"""Unit tests of the Raft core's rules, one behaviour each, named after what they check.

The scenario files (tests/raft/testdata) show whole interactions; the simulator checks the
invariants under faults. These pin down the individual rules and the error contract.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from raftnet import Net

from dkv.errors import (
    ConfChangeRejected,
    InvalidArgument,
    InvariantViolation,
    NotLeader,
    ProposalDropped,
    ReadIndexDropped,
)
from dkv.raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    Entry,
    HardState,
    MemoryStorage,
    Message,
    MessageType,
    RawNode,
    Role,
)
from dkv.raft.core import Raft
from dkv.raft.progress import ProgressState
from dkv.testing.memhost import encode_command

MT = MessageType


def put(i: int, size: int = 0) -> bytes:
    return encode_command(f"op{i}", "put", "k", str(i) + "x" * size)


# -- elections ------------------------------------------------------------------------------------


def test_randomized_election_timeout_is_in_t_to_2t() -> None:
    """Thesis §3.4: timeouts are drawn from [T, 2T) so split votes are rare."""
    storage = MemoryStorage(ConfState.of([1, 2, 3]))
    r = Raft(Config(id=1, election_timeout_ticks=10), storage, random.Random(3))
    seen = set()
    for _ in range(500):
        r._reset_randomized_election_timeout()
        seen.add(r.randomized_election_timeout)
    assert min(seen) == 10 and max(seen) == 19


def test_follower_campaigns_after_its_election_timeout_and_wins() -> None:
    net = Net([1, 2, 3])
    net.tick(25, only=[1])  # only node 1's clock runs, so it times out first
    assert net.leaders() == [1]
    assert net[1].raw().status().term == 2  # bootstrap is term 1; the first election is 2


def test_single_voter_elects_itself_and_commits_alone() -> None:
    net = Net([1])
    net.elect(1)
    net[1].raw().propose(put(1))
    net.stabilize()
    assert net[1].sm.get("k") == "1"


def test_learner_never_campaigns() -> None:
    net = Net([1, 2], learners=[3])
    net.tick(100, only=[3])
    assert net.role(3) is Role.FOLLOWER
    assert net[3].raw().status().term == 1  # the bootstrap term: it never campaigned


def test_vote_needs_an_up_to_date_log() -> None:
    """Thesis §3.6.1: a voter denies its vote to a candidate with a less complete log."""
    net = Net([1, 2, 3], pre_vote=False)
    net.elect(1)
    net.cut = {3}
    net[1].raw().propose(put(1))
    net.stabilize()
    net.cut = {1}  # 3 (stale log) campaigns; 2 has the newer entry and must refuse
    net[3].raw().campaign()
    net.stabilize()
    assert net.role(3) is not Role.LEADER
    votes = [m for m in net.stabilize() if m.type is MT.VOTE_RESP]
    assert all(m.reject for m in votes)


def test_prevote_does_not_raise_the_term_of_a_partitioned_node() -> None:
    """Thesis §9.6: a node that cannot win does not disrupt the cluster with a higher term."""
    net = Net([1, 2, 3])
    net.elect(1)
    net.cut = {3}
    net.tick(100, only=[3])
    assert net[3].raw().status().term == 2
    net.cut = set()
    net.tick(3)
    assert net.leaders() == [1] and net[1].raw().status().term == 2


def test_live_follower_ignores_higher_term_vote_requests() -> None:
    """Thesis §4.2.3: a follower that hears from its leader ignores RequestVote."""
    net = Net([1, 2, 3], pre_vote=False)
    net.elect(1)
    net[2].raw().step(Message(MT.VOTE, to=2, frm=3, term=5, index=100, log_term=5))
    assert net[2].raw().status().term == 2
    assert net[2].raw().ready().messages == ()


def test_check_quorum_makes_an_isolated_leader_step_down() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net.cut = {1}
    net.tick(2 * 10 + 1, only=[1])
    assert net.role(1) is Role.FOLLOWER


def test_without_check_quorum_an_isolated_leader_stays() -> None:
    net = Net([1, 2, 3], check_quorum=False)
    net.elect(1)
    net.cut = {1}
    net.tick(50, only=[1])
    assert net.role(1) is Role.LEADER


# -- replication ----------------------------------------------------------------------------------


def test_inflight_window_bounds_messages_to_a_silent_follower() -> None:
    """Flow control: at most max_inflight_msgs AppendEntries to a follower that never acks."""
    net = Net([1, 2, 3], max_inflight_msgs=4)
    net.elect(1)
    net.cut = {3}
    for i in range(50):
        net[1].raw().propose(put(i))
        net.stabilize()
    to3 = [m for m in net.dropped if m.to == 3 and m.type is MT.APP and m.entries]
    assert 0 < len(to3) <= 4
    pr = net[1].raw().status().progress[3]
    assert pr.state is ProgressState.REPLICATE
    # Meanwhile 2 received everything: one slow follower does not hold back the others
    # (it learns the last commit index from the next heartbeat).
    net.tick(1, only=[1])
    assert net[2].applied_index == net[1].applied_index


def test_batched_proposals_travel_in_one_append() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net[1].raw().propose_batch([put(i) for i in range(100)])
    msgs = net.stabilize()
    apps = [m for m in msgs if m.type is MT.APP and m.entries]
    assert len(apps) == 2  # one per follower
    assert all(len(m.entries) == 100 for m in apps)


def test_max_msg_bytes_splits_large_appends() -> None:
    net = Net([1, 2], max_msg_bytes=1000)
    net.elect(1)
    net[1].raw().propose_batch([put(i, 250) for i in range(10)])
    msgs = net.stabilize()
    apps = [m for m in msgs if m.type is MT.APP and m.entries]
    assert len(apps) > 1
    assert all(sum(e.size_bytes() for e in m.entries) <= 1000 for m in apps)


def test_uncommitted_tail_is_bounded() -> None:
    net = Net([1, 2, 3], max_uncommitted_entries_bytes=2500)
    net.elect(1)
    net.cut = {2, 3}
    net[1].raw().propose(put(1, 1500))
    with pytest.raises(ProposalDropped, match="uncommitted"):
        net[1].raw().propose(put(2, 1500))
    net.cut = set()
    net.tick(2)
    net[1].raw().propose(put(3, 1500))  # the tail committed, so there is room again


def test_leader_sends_appends_before_its_write_and_counts_itself_once_written() -> None:
    """Thesis §10.2.1: the leader's appends are early messages (sent while its own write is
    in flight); its own copy counts toward a commit only after advance() says it is written,
    so one follower's acknowledgement of an unwritten entry commits nothing."""
    net = Net([1, 2, 3])
    net.elect(1)
    leader = net[1].raw()
    index = leader.propose(put(1))
    rd = leader.ready()
    early = rd.early_messages()
    assert {m.to for m in early if m.type is MT.APP and m.entries} == {2, 3}
    assert rd.late_messages() == []
    assert [e.index for e in rd.entries] == [index]
    # Follower 2 holds the entry (and says so) before the leader's write ended.
    leader.step(Message(MT.APP_RESP, to=1, frm=2, term=leader.hard_state().term, index=index))
    assert leader.status().commit == index - 1  # one durable copy of two needed
    net[1].storage.append(rd.entries)
    leader.advance()  # written: now two copies
    assert leader.status().commit == index


def test_commit_index_travels_with_the_next_append_or_heartbeat() -> None:
    """No empty append (and no acknowledgement of it) only to tell followers a new commit
    index: they learn it from the next append or heartbeat."""
    net = Net([1, 2, 3])
    net.elect(1)
    net.tick(1, only=[1])
    net[1].raw().propose(put(1))
    msgs = net.stabilize()
    index = net[1].raw().status().commit
    assert net[1].sm.get("k") == "1"
    assert not [m for m in msgs if m.type is MT.APP and not m.entries]
    assert [net[i].raw().status().commit for i in (2, 3)] == [index - 1, index - 1]
    net[1].raw().propose(put(2))  # the next append carries it
    msgs = net.stabilize()
    assert all(m.commit == index for m in msgs if m.type is MT.APP)
    assert [net[i].sm.get("k") for i in (2, 3)] == ["1", "1"]
    net.tick(1, only=[1])  # and a heartbeat carries the last one
    assert [net[i].sm.get("k") for i in (1, 2, 3)] == ["2", "2", "2"]


def test_follower_answers_the_appends_of_one_ready_once() -> None:
    """Appends stepped while a Ready was being written are acknowledged by one message with
    the highest index (the leader keeps only the highest match); a rejection is kept."""
    storage = MemoryStorage(ConfState.of([1, 2, 3]))  # holds index 1 (term 1)
    storage.set_hard_state(HardState(term=2, vote=1, commit=1))
    node = RawNode(Config(id=2), storage, random.Random(1))
    for i in (2, 3, 4):
        prev_term = 1 if i == 2 else 2
        app = Message(MT.APP, to=2, frm=1, term=2, index=i - 1, log_term=prev_term)
        node.step(dataclasses.replace(app, entries=(Entry(2, i, data=put(i)),)))
    node.step(Message(MT.APP, to=2, frm=1, term=2, index=9, log_term=2))  # a gap: rejected
    acks = [m for m in node.ready().messages if m.type is MT.APP_RESP]
    assert [(m.index, m.reject) for m in acks] == [(4, False), (9, True)]


def test_follower_forwards_proposals_to_the_leader() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    assert net[2].raw().propose(put(7)) is None
    net.stabilize()
    net.tick(1, only=[1])  # the heartbeat carries the commit index to the followers
    assert all(net[i].sm.get("k") == "7" for i in (1, 2, 3))


def test_follower_rejects_proposals_when_forwarding_is_disabled() -> None:
    net = Net([1, 2, 3], disable_proposal_forwarding=True)
    net.elect(1)
    with pytest.raises(NotLeader) as exc:
        net[2].raw().propose(put(7))
    assert exc.value.leader_hint == 1


def test_proposal_without_leader_is_dropped() -> None:
    net = Net([1, 2, 3])
    with pytest.raises(ProposalDropped, match="no leader"):
        net[1].raw().propose(put(1))


def test_leader_never_commits_an_old_term_entry_by_counting() -> None:
    """Thesis §3.6.2 (figure 3.7): replicas of an old-term entry on a majority are not enough;
    it commits only together with an entry of the leader's own term."""
    storage = MemoryStorage(ConfState.of([1, 2, 3]))
    storage.append([Entry(1, 1), Entry(1, 2)])  # index 2 from term 1, never committed
    storage.set_hard_state(HardState(term=2, vote=1, commit=1))
    r = Raft(Config(id=1), storage, random.Random(1))
    r.become_candidate()
    r.become_leader()  # term 3; appends its no-op at index 3
    assert r.term == 3 and r.log.last_index() == 3
    r.step(Message(MT.APP_RESP, to=1, frm=2, term=3, index=2))  # 2 holds index 2 now
    assert r.trk.committed_index() == 2  # on a majority...
    assert r.log.committed == 1  # ...but from term 1: not committed by counting
    r.step(Message(MT.APP_RESP, to=1, frm=2, term=3, index=3))
    # The leader's own no-op is not written yet (thesis §10.2.1): one durable copy of 3.
    assert r.log.committed == 1
    r.on_persisted(3, 3)
    assert r.log.committed == 3  # the term-3 no-op commits, and index 2 with it


# -- errors and contracts --------------------------------------------------------------------


def test_ready_twice_without_advance_is_a_bug() -> None:
    node = RawNode(Config(id=1), MemoryStorage(ConfState.of([1])), random.Random(1))
    node.campaign()
    node.ready()
    with pytest.raises(InvariantViolation):
        node.ready()


def test_local_message_from_the_network_is_refused() -> None:
    node = RawNode(Config(id=1), MemoryStorage(ConfState.of([1, 2])), random.Random(1))
    with pytest.raises(InvalidArgument, match="local message"):
        node.step(Message(MT.HUP, to=1, frm=2))
    with pytest.raises(InvalidArgument, match="delivered to"):
        node.step(Message(MT.APP, to=9, frm=2, term=1))


def test_bad_config_is_refused_with_a_reason() -> None:
    with pytest.raises(InvalidArgument, match="election_timeout_ticks"):
        Config(id=1, election_timeout_ticks=1, heartbeat_interval_ticks=1).validate()
    with pytest.raises(InvalidArgument, match="lease-based"):
        from dkv.raft import ReadOnlyOption

        Config(id=1, check_quorum=False, read_only_option=ReadOnlyOption.LEASE_BASED).validate()


def test_must_sync_only_when_term_vote_or_entries_change() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net[1].raw().propose(put(1))
    rd = net[1].raw().ready()
    assert rd.entries and rd.must_sync
    net[1].raw().advance()
    # A heartbeat-only Ready (commit moves at the follower) needs no fsync.
    net[1].raw().tick()
    rd = net[1].raw().ready()
    assert rd.messages and not rd.must_sync
    net[1].raw().advance()


def test_ready_sequence_numbers_increase() -> None:
    net = Net([1, 2, 3])
    node = net[1].raw()
    node.campaign()
    first = node.ready().seq
    node.advance()
    node.tick()
    second = node.ready().seq
    assert second == first + 1


def test_append_that_conflicts_with_a_committed_entry_raises() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net[1].raw().propose(put(1))
    net.stabilize()
    r2 = net[2].raw().raft
    committed = r2.log.committed
    with pytest.raises(InvariantViolation, match="conflicts with committed"):
        r2.log.maybe_append(committed - 1, r2.log.term(committed - 1), 0, [Entry(99, committed)])


# -- membership -----------------------------------------------------------------------------------


def test_only_one_conf_change_at_a_time() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net.add(4)
    net[1].raw().propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    with pytest.raises(ConfChangeRejected, match="pending"):
        net[1].raw().propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    net.stabilize()
    net[1].raw().propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    net.stabilize()
    assert net[1].conf_state == ConfState.of([1, 2, 3, 4])


def test_invalid_conf_changes_are_rejected_with_a_reason() -> None:
    net = Net([1])
    net.elect(1)
    with pytest.raises(ConfChangeRejected, match="last voter"):
        net[1].raw().propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    with pytest.raises(ConfChangeRejected, match="already a voter"):
        net[1].raw().propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 1))
    with pytest.raises(ConfChangeRejected, match="not a member"):
        net[1].raw().propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 5))
    with pytest.raises(NotLeader):
        Net([1, 2])[2].raw().propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))


def test_learner_does_not_count_for_the_quorum() -> None:
    net = Net([1, 2], learners=[3])
    net.elect(1)
    net.cut = {2}
    net[1].raw().propose(put(1))
    net.stabilize()
    # The learner has the entry, the leader too: 2 of 3 members, but only 1 of 2 voters.
    assert net[3].raw().raft.log.last_index() == net[1].raw().raft.log.last_index()
    assert net[1].sm.get("k") is None


def test_removed_leader_steps_down_and_the_rest_elect() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net[1].raw().propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    net.stabilize()
    assert net.role(1) is Role.FOLLOWER
    net.cut = {1}
    net.tick(40)
    assert len(net.leaders()) == 1 and net.leaders()[0] in (2, 3)


# -- reads and transfer ---------------------------------------------------------------------------


def test_read_index_without_a_leader_is_dropped() -> None:
    net = Net([1, 2, 3])
    with pytest.raises(ReadIndexDropped):
        net[2].raw().read_index(b"r")


def test_read_index_waits_for_the_leaders_first_commit() -> None:
    """Thesis §6.4 step 1: the leader must know the commit index of its term first."""
    net = Net([1, 2, 3])
    net[1].raw().campaign()
    # Deliver only the votes, not the no-op's acknowledgements.
    for _ in range(3):
        for h in net.hosts.values():
            for m in h.process_ready():
                if m.type in (MT.PRE_VOTE, MT.PRE_VOTE_RESP, MT.VOTE, MT.VOTE_RESP):
                    net[m.to].raw().step(m)
    assert net.role(1) is Role.LEADER
    net[1].raw().read_index(b"early")
    net[1].process_ready()
    assert net[1].raw().raft.pending_read_index_msgs
    assert not net[1].read_states
    net.tick(1)
    assert [rs.request_ctx for rs in net[1].take_read_states()] == [b"early"]


def test_pending_reads_are_bounded() -> None:
    net = Net([1, 2, 3], max_pending_read_index=2)
    net.elect(1)
    net.cut = {2, 3}
    net[1].raw().read_index(b"a")
    net[1].raw().read_index(b"b")
    with pytest.raises(ReadIndexDropped, match="pending"):
        net[1].raw().read_index(b"c")


def test_proposals_are_dropped_during_leadership_transfer() -> None:
    net = Net([1, 2, 3])
    net.elect(1)
    net.cut = {2}
    net[1].raw().propose(put(1))
    net.stabilize()
    net[1].raw().transfer_leader(2)
    net.stabilize()
    with pytest.raises(ProposalDropped, match="transfer"):
        net[1].raw().propose(put(2))
    # The transfer times out after an election timeout; proposals resume.
    net.tick(10, only=[1])
    assert net.role(1) is Role.LEADER
    net[1].raw().propose(put(3))


def test_transfer_to_a_learner_is_ignored() -> None:
    net = Net([1, 2], learners=[3])
    net.elect(1)
    net[1].raw().transfer_leader(3)
    net.stabilize()
    assert net.leaders() == [1] and net[1].raw().status().lead_transferee == 0


# -- snapshots ------------------------------------------------------------------------------------


def _rejoin_after_compaction(heartbeats: int, **cfg: object) -> tuple[Net, list[Message]]:
    """Node 3 misses 20 writes while everyone snapshots every 5 entries and keeps no log
    behind the snapshot; then it rejoins. Returns the net and what was delivered after."""
    net = Net([1, 2, 3], **cfg)
    for h in net.hosts.values():
        h.snapshot_every_entries = 5
        h.compact_keep_entries = 0
    net.elect(1)
    net.cut = {3}
    for i in range(20):
        net[1].raw().propose(put(i))
        net.stabilize()
    net.cut = set()
    delivered: list[Message] = []
    for _ in range(heartbeats):
        net[1].raw().tick()
        delivered += net.stabilize()
    return net, delivered


def test_oversized_snapshot_is_rejected_by_the_follower() -> None:
    net, delivered = _rejoin_after_compaction(3, snapshot_chunk_bytes=64, max_snapshot_bytes=100)
    assert any(m.type is MT.SNAP_RESP and m.reject and m.frm == 3 for m in delivered)
    assert net[3].applied_index < net[1].applied_index
    assert net[3].snapshots_installed == 0


def test_lagging_follower_catches_up_by_chunked_snapshot() -> None:
    net, delivered = _rejoin_after_compaction(5, snapshot_chunk_bytes=32)
    chunks = [m for m in delivered if m.type is MT.SNAP]
    assert len(chunks) > 1
    assert net[3].snapshots_installed == 1
    assert net[3].sm.data == net[1].sm.data


def test_forwarded_proposal_the_leader_cannot_take_is_dropped_not_raised() -> None:
    """Only our own requests raise; a peer's forwarded proposal is dropped like a lost message."""
    net = Net([1, 2, 3])
    net.elect(1)
    net.cut = {3}
    net[1].raw().propose(put(1))
    net.stabilize()
    net[1].raw().transfer_leader(3)  # 3 lags, so the transfer stays in progress
    net.stabilize()
    forwarded = Message(MT.PROP, to=1, frm=2, entries=(Entry(0, 0, data=put(2)),))
    net[1].raw().step(forwarded)  # must not raise
    assert net[1].raw().status().last_index == net[1].raw().status().commit


def test_lease_read_is_served_at_once_while_the_lease_holds() -> None:
    from dkv.raft import ReadOnlyOption

    net = Net([1, 2, 3], read_only_option=ReadOnlyOption.LEASE_BASED)
    net.elect(1)
    net.tick(1)  # one acknowledged heartbeat round starts the lease
    net[1].raw().read_index(b"fast")
    net[1].process_ready()
    assert [rs.request_ctx for rs in net[1].take_read_states()] == [b"fast"]


def test_lapsed_lease_falls_back_to_a_heartbeat_round() -> None:
    """Thesis §6.4.1: the lease is bounded by when acknowledged heartbeats were *sent*."""
    from dkv.raft import ReadOnlyOption

    net = Net([1, 2, 3], read_only_option=ReadOnlyOption.LEASE_BASED)
    net.elect(1)
    net.tick(1)
    net.cut = {1}
    net.tick(9, only=[1])  # T - 1 ticks with no acknowledgement: the lease has lapsed
    net[1].raw().read_index(b"late")
    net[1].process_ready()
    assert net[1].take_read_states() == []  # not served from a stale lease
    net.cut = set()
    net.tick(1, only=[1])
    assert [rs.request_ctx for rs in net[1].take_read_states()] == [b"late"]


def test_new_member_joins_through_the_bootstrap_snapshot() -> None:
    """A node added later must learn the initial configuration before replaying changes."""
    net = Net([1, 2, 3])
    net.elect(1)
    net.add(4)  # empty storage: knows nothing
    net[1].raw().propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    net.stabilize()
    net.tick(2)
    assert net[4].conf_state == ConfState.of([1, 2, 3, 4])
    assert net[4].raw().status().conf_state == ConfState.of([1, 2, 3, 4])


def test_leader_recovers_when_every_message_in_the_window_was_lost() -> None:
    """A full in-flight window of lost appends must not stall a follower forever."""
    net = Net([1, 2, 3], max_inflight_msgs=2)
    net.elect(1)
    net.cut = {3}
    for i in range(5):
        net[1].raw().propose(put(i))
        net.stabilize()
    assert net[1].raw().raft.trk.progress[3].inflights.full()
    net.cut = set()
    net.tick(3)  # heartbeats: 3 answers, the leader notices the gap and repairs it
    assert net[3].applied_index == net[1].applied_index


def test_leader_with_a_bare_quorum_survives_check_quorum() -> None:
    """The leader counts itself as active: leader + one follower is a quorum of three."""
    net = Net([1, 2, 3])
    net[3].crash()
    net.elect(1)
    term = net[1].raw().status().term
    net.tick(3 * 10, only=[1, 2])  # several CheckQuorum rounds
    assert net.role(1) is Role.LEADER
    assert net[1].raw().status().term == term  # never stepped down and re-elected


def test_stale_leader_is_told_the_newer_term_even_without_prevote_or_check_quorum() -> None:
    """Thesis §3.3: a request with a stale term is rejected with the current term, so a node
    partitioned into a higher term can rejoin (found by the simulator)."""
    net = Net([1, 2, 3], pre_vote=False, check_quorum=False)
    net.elect(1)
    r2 = net[2].raw().raft
    r2.become_follower(r2.term + 5, 0)  # as if it had campaigned alone while partitioned
    net[2].process_ready()
    net[2].raw().step(Message(MT.HEARTBEAT, to=2, frm=1, term=net[1].raw().status().term))
    replies = [m for m in net[2].process_ready() if m.to == 1]
    assert [(m.type, m.term) for m in replies] == [(MT.APP_RESP, r2.term)]
