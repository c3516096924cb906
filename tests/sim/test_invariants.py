"""The invariant checkers fail on hand-made violating states, and pass on the legal ones next
to them: a checker that cannot fail proves nothing.

Each test builds the smallest state that breaks one property of the Raft paper's figure 3 (or
linearizability) and asserts the checker names that property.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from dkv.raft import Entry, EntryType, Snapshot, SnapshotMetadata
from dkv.testing.invariants import (
    APPLIED_CONSISTENT,
    COMMITTED_DURABLE,
    ELECTION_SAFETY,
    LEADER_COMPLETENESS,
    LINEARIZABILITY,
    LOG_MATCHING,
    STATE_MACHINE_SAFETY,
    DurableLog,
    InvariantFailure,
    RaftInvariants,
    check_applied_entries,
    check_history,
    check_log_matching,
    check_state_machines,
)
from dkv.testing.linearizability import Operation
from dkv.testing.sim import CheckedStorage


def put(term: int, index: int, value: str) -> Entry:
    return Entry(term, index, EntryType.NORMAL, f"put k {value}".encode())


class ListLog:
    """A log as a leader holds it: entries from ``first`` on, after a snapshot of ``snap_term``."""

    def __init__(self, entries: Sequence[Entry], snap_term: int = 0) -> None:
        self.entries = list(entries)
        self.snap_term = snap_term

    def first_index(self) -> int:
        return self.entries[0].index if self.entries else 1

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else 0

    def term(self, index: int) -> int:
        if index == self.first_index() - 1:
            return self.snap_term
        return self.entries[index - self.first_index()].term

    # DurableLog
    def snapshot_index(self) -> int:
        return self.first_index() - 1


# -- election safety -----------------------------------------------------------------------------


def test_two_leaders_in_one_term_violate_election_safety() -> None:
    inv = RaftInvariants()
    inv.observe_role(1, 3, is_leader=True)
    inv.observe_role(2, 3, is_leader=False)
    inv.observe_role(1, 3, is_leader=True)  # the same leader, observed again: fine
    inv.observe_role(2, 4, is_leader=True)  # another term, another leader: fine
    with pytest.raises(InvariantFailure) as exc:
        inv.observe_role(3, 3, is_leader=True)
    assert exc.value.invariant == ELECTION_SAFETY
    assert "nodes 1 and 3" in exc.value.detail and "term 3" in exc.value.detail


def test_election_safety_remembers_leaders_that_crashed() -> None:
    """A crashed node's leadership still counts: history, not the current roles, is checked."""
    inv = RaftInvariants()
    inv.observe_role(1, 7, is_leader=True)
    inv.observe_role(1, 7, is_leader=False)  # crashed / stepped down
    with pytest.raises(InvariantFailure, match="both leader in term 7"):
        inv.observe_role(2, 7, is_leader=True)


# -- log matching --------------------------------------------------------------------------------


def test_same_index_and_term_with_different_data_violates_log_matching() -> None:
    a = [put(1, 1, "a"), put(1, 2, "b")]
    b = [put(1, 1, "a"), put(1, 2, "EVIL")]
    check_log_matching({1: (0, a), 2: (0, a)})
    with pytest.raises(InvariantFailure) as exc:
        check_log_matching({1: (0, a), 2: (0, b)})
    assert exc.value.invariant == LOG_MATCHING
    assert "entry 2 of term 1 differs between node 1" in exc.value.detail


def test_shared_entry_with_different_prefixes_violates_log_matching() -> None:
    """Entry (3, term 3) on both nodes, but the entries before it differ in term."""
    a = [put(1, 1, "a"), put(2, 2, "b"), put(3, 3, "c")]
    b = [put(1, 1, "a"), put(1, 2, "x"), put(3, 3, "c")]
    with pytest.raises(InvariantFailure) as exc:
        check_log_matching({1: (0, a), 2: (0, b)})
    assert exc.value.invariant == LOG_MATCHING
    assert "not the prefix" in exc.value.detail


def test_logs_that_diverge_after_a_term_change_are_legal() -> None:
    """A follower holding an uncommitted tail of an old term: legal until it is repaired."""
    a = [put(1, 1, "a"), put(2, 2, "b"), put(2, 3, "c")]
    b = [put(1, 1, "a"), put(3, 2, "y")]
    check_log_matching({1: (0, a), 2: (0, b)})


def test_logs_starting_after_different_snapshots_are_compared_where_they_overlap() -> None:
    full = [put(1, 1, "a"), put(1, 2, "b"), put(2, 3, "c")]
    check_log_matching({1: (0, full), 2: (1, full[2:])})
    with pytest.raises(InvariantFailure, match="not the prefix"):
        check_log_matching({1: (0, full), 2: (2, full[2:])})  # snapshot says term 2 at 2


def test_a_gap_inside_one_log_is_reported() -> None:
    with pytest.raises(InvariantFailure, match="entry 3 follows entry 1"):
        check_log_matching({1: (0, [put(1, 1, "a"), put(1, 3, "c")])})


# -- leader completeness -------------------------------------------------------------------------


def test_a_committed_entry_missing_from_a_later_leader_violates_leader_completeness() -> None:
    inv = RaftInvariants()
    committed = put(2, 5, "acked")
    inv.observe_apply(1, committed, node_term=2)
    short = ListLog([put(1, 1, "a"), put(1, 2, "b"), put(2, 3, "c"), put(2, 4, "d")])
    inv.check_leader_log(2, 2, short)  # a leader of the same term may lag: not "later"
    with pytest.raises(InvariantFailure) as exc:
        inv.check_leader_log(3, 3, short)
    assert exc.value.invariant == LEADER_COMPLETENESS
    assert "ends at 4, without committed entry 5" in exc.value.detail


def test_a_later_leader_with_another_entry_at_a_committed_index_is_caught() -> None:
    inv = RaftInvariants()
    inv.observe_apply(1, put(2, 2, "acked"), node_term=2)
    other = ListLog([put(1, 1, "a"), put(3, 2, "other"), put(4, 3, "x")])
    with pytest.raises(InvariantFailure, match="entry of term 3 at 2"):
        inv.check_leader_log(3, 4, other)


def test_leader_completeness_only_checks_the_given_new_commits_when_asked() -> None:
    inv = RaftInvariants()
    old = inv.observe_apply(1, put(1, 1, "a"), node_term=1)
    new = inv.observe_apply(1, put(1, 2, "b"), node_term=1)
    assert old is not None and new is not None
    leader = ListLog([put(1, 1, "a")])  # lacks entry 2
    inv.check_leader_log(2, 2, leader, only=[old])
    with pytest.raises(InvariantFailure, match="without committed entry 2"):
        inv.check_leader_log(2, 2, leader, only=[new])


def test_entries_below_a_leaders_snapshot_are_covered_by_it() -> None:
    inv = RaftInvariants()
    inv.observe_apply(1, put(1, 1, "a"), node_term=1)
    inv.check_leader_log(2, 5, ListLog([put(4, 7, "z")], snap_term=4))


def test_the_commit_term_bound_is_the_lowest_term_an_entry_was_applied_in() -> None:
    inv = RaftInvariants()
    assert inv.observe_apply(1, put(2, 3, "x"), node_term=6) is not None
    assert inv.observe_apply(2, put(2, 3, "x"), node_term=2) is None  # not new
    assert inv.committed[3].commit_term_max == 2
    with pytest.raises(InvariantFailure, match="committed by term 2 at the latest"):
        inv.check_leader_log(9, 3, ListLog([put(1, 1, "a")]))


# -- state-machine safety ------------------------------------------------------------------------


def test_two_nodes_applying_different_entries_at_one_index_violate_sm_safety() -> None:
    inv = RaftInvariants()
    inv.observe_apply(1, put(2, 4, "a"), node_term=2)
    inv.observe_apply(2, put(2, 4, "a"), node_term=3)  # the same entry elsewhere: fine
    with pytest.raises(InvariantFailure) as exc:
        inv.observe_apply(3, put(3, 4, "b"), node_term=3)
    assert exc.value.invariant == STATE_MACHINE_SAFETY
    assert "index 4: node 1 applied term 2" in exc.value.detail


def test_whole_state_check_of_applied_entries() -> None:
    same = {1: (1, EntryType.NORMAL, b"a"), 2: (1, EntryType.NORMAL, b"b")}
    check_applied_entries({1: same, 2: {1: same[1]}})
    with pytest.raises(InvariantFailure, match=STATE_MACHINE_SAFETY):
        check_applied_entries({1: same, 2: {2: (1, EntryType.CONF_CHANGE, b"b")}})


def test_nodes_at_one_applied_index_must_hold_the_same_state() -> None:
    check_state_machines({1: (5, b"{a}"), 2: (5, b"{a}"), 3: (4, b"{}")})
    with pytest.raises(InvariantFailure) as exc:
        check_state_machines({1: (5, b"{a}"), 2: (5, b"{b}")})
    assert exc.value.invariant == APPLIED_CONSISTENT


# -- acknowledged (committed) writes are never lost ----------------------------------------------


def test_truncating_a_committed_entry_is_an_acknowledged_write_lost() -> None:
    inv = RaftInvariants()
    inv.observe_apply(1, put(2, 5, "acked"), node_term=2)
    inv.observe_append(2, 2, [put(3, 6, "new")], removed=[(6, 2)])  # uncommitted: fine
    with pytest.raises(InvariantFailure) as exc:
        inv.observe_append(2, 2, [put(3, 5, "overwrite")], removed=[(5, 2), (6, 3)])
    assert exc.value.invariant == COMMITTED_DURABLE
    assert "node 2 truncated committed entry 5" in exc.value.detail


def test_storage_hooks_report_an_overwritten_committed_entry() -> None:
    """The same, end to end through the simulator's storage wrapper and MemoryStorage."""
    inv = RaftInvariants()
    st = CheckedStorage(1, inv)
    st.append([put(1, 1, "a"), put(1, 2, "b"), put(1, 3, "c")])
    st.append([put(2, 3, "c2")])  # entry 3 was never committed: replacing it is legal
    inv.observe_apply(2, put(1, 2, "b"), node_term=1)
    with pytest.raises(InvariantFailure, match="node 1 truncated committed entry 2"):
        st.append([put(3, 2, "b3")])


def test_storage_hooks_report_a_snapshot_that_wipes_committed_entries() -> None:
    inv = RaftInvariants()
    st = CheckedStorage(1, inv)
    st.append([put(1, 1, "a"), put(1, 2, "b"), put(1, 3, "c")])
    inv.observe_apply(2, put(1, 3, "c"), node_term=1)
    snap = Snapshot(SnapshotMetadata(index=2, term=5), b"")
    with pytest.raises(InvariantFailure, match="truncated committed entry 3"):
        st.apply_snapshot(snap)


def test_storage_hooks_check_log_matching_across_nodes() -> None:
    inv = RaftInvariants()
    CheckedStorage(1, inv).append([put(1, 1, "a"), put(1, 2, "b")])
    with pytest.raises(InvariantFailure, match=LOG_MATCHING):
        CheckedStorage(2, inv).append([put(1, 1, "a"), put(1, 2, "not b")])


def test_a_committed_entry_durable_on_too_few_voters_could_be_lost() -> None:
    inv = RaftInvariants()
    inv.observe_apply(1, put(2, 3, "acked"), node_term=2)
    has = ListLog([put(1, 1, "a"), put(1, 2, "b"), put(2, 3, "acked")])
    lacks = ListLog([put(1, 1, "a"), put(1, 2, "b")])
    other_term = ListLog([put(1, 1, "a"), put(1, 2, "b"), put(3, 3, "x")])
    snapshotted = ListLog([put(2, 4, "later")], snap_term=2)
    durable: dict[int, DurableLog] = {1: has, 2: has, 3: lacks}
    inv.check_durable_quorum([1, 2, 3], durable)  # 2 of 3: a majority holds it
    inv.check_durable_quorum([1, 3, 4], {1: has, 3: lacks, 4: snapshotted})
    with pytest.raises(InvariantFailure) as exc:
        inv.check_durable_quorum([1, 2, 3], {1: has, 2: lacks, 3: other_term})
    assert exc.value.invariant == COMMITTED_DURABLE
    assert "voters [2, 3] lack it" in exc.value.detail
    with pytest.raises(InvariantFailure, match="durable on voters \\[1\\] only"):
        inv.check_durable_quorum([1, 2, 3], {1: has})  # crashed voters' state is unknown


# -- linearizability -----------------------------------------------------------------------------


def op(client: int, inp: tuple[object, ...], call: float, out: object, ret: float) -> Operation:
    return Operation(client, inp, call, out, ret)


def test_a_stale_read_is_reported_as_not_linearizable() -> None:
    history = [
        op(1, ("put", "k", "1"), 0, True, 10),
        op(2, ("put", "k", "2"), 20, True, 30),
        op(3, ("get", "k"), 40, "1", 50),  # reads the value overwritten before it was called
    ]
    check_history(history[:2])
    with pytest.raises(InvariantFailure) as exc:
        check_history(history)
    assert exc.value.invariant == LINEARIZABILITY
    assert "not linearizable" in exc.value.detail
    assert "get 'k' -> '1'" in exc.value.detail  # the checker's explanation is included


def test_an_acknowledged_write_lost_shows_in_the_history() -> None:
    history = [
        op(1, ("put", "k", "1"), 0, True, 10),
        op(2, ("get", "k"), 20, None, 30),  # the acknowledged write vanished
    ]
    with pytest.raises(InvariantFailure, match="not linearizable"):
        check_history(history)


def test_a_write_with_unknown_outcome_may_explain_a_read() -> None:
    unknown = Operation.unknown(1, ("put", "k", "1"), 0)
    read = op(2, ("get", "k"), 20, "1", 30)
    assert unknown.return_ == math.inf
    check_history([unknown, read])
    with pytest.raises(InvariantFailure, match="not linearizable"):
        check_history([read])  # without it, nobody wrote "1"


def test_a_checker_timeout_is_reported_not_ignored() -> None:
    ticks = iter(range(1_000_000))
    history = [op(i, ("put", "k", str(i)), 0, True, 100) for i in range(12)]
    history.append(op(99, ("get", "k"), 0, "nobody wrote this", 100))
    with pytest.raises(InvariantFailure, match=r"gave up after 0\.5s"):
        check_history(history, timeout_s=0.5, clock=lambda: float(next(ticks)))
