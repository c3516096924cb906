"""What a leader knows about each follower's log, and quorum arithmetic.

Flow control follows etcd-io/raft (and thesis §10.2.1 on pipelining): a follower is in one of
three states.

- PROBE: we do not know where its log matches ours. Send one AppendEntries per heartbeat
  interval and wait for the answer before sending the next, walking ``next`` back on rejection.
- REPLICATE: its log matches up to ``match``. Stream AppendEntries optimistically (pipelining),
  advancing ``next`` on send, bounded by an in-flight window of ``max_inflight_msgs``.
- SNAPSHOT: the entries it needs were compacted; an InstallSnapshot transfer is under way and
  no AppendEntries are sent until it finishes.
"""

from __future__ import annotations

import enum
from collections import deque

from dkv.errors import InvariantViolation
from dkv.raft.types import ConfState, Snapshot

__all__ = ["Inflights", "Progress", "ProgressState", "ProgressTracker", "VoteResult"]


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """A bounded window of AppendEntries in flight to one follower, each remembered by the last
    index it carried. Acknowledging index i frees every message up to i."""

    __slots__ = ("_q", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._q: deque[int] = deque()

    def add(self, last_index: int) -> None:
        if self.full():
            raise InvariantViolation("in-flight window overflow")
        self._q.append(last_index)

    def free_le(self, index: int) -> None:
        q = self._q
        while q and q[0] <= index:
            q.popleft()

    def full(self) -> bool:
        return len(self._q) >= self.capacity

    def count(self) -> int:
        return len(self._q)

    def reset(self) -> None:
        self._q.clear()


class Progress:
    """Replication state of one peer, as tracked by the leader."""

    __slots__ = (
        "inflights",
        "is_learner",
        "lease_ack_tick",
        "match",
        "msg_app_flow_paused",
        "next",
        "pending_snapshot",
        "recent_active",
        "snapshot",
        "snapshot_acked",
        "snapshot_offset",
        "state",
    )

    def __init__(self, next_index: int, max_inflight_msgs: int, is_learner: bool) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        # In PROBE: one message sent and not answered yet; reset on heartbeat response so a
        # lost probe is retried once per heartbeat interval.
        self.msg_app_flow_paused = False
        self.pending_snapshot = 0  # index of the snapshot being sent, in SNAPSHOT state
        self.snapshot: Snapshot | None = None  # that snapshot, pinned for the transfer
        self.snapshot_offset = 0  # bytes of it acknowledged so far (chunked transfer)
        # A chunk was acknowledged since the last heartbeat; if not, the leader resends.
        self.snapshot_acked = False
        # Heard from since the last CheckQuorum (thesis §6.2).
        self.recent_active = False
        # The leader's tick at which the newest heartbeat this peer acknowledged was sent
        # (-1: none yet in this term); bounds the leader lease (core.Raft._lease_valid).
        self.lease_ack_tick = -1
        self.inflights = Inflights(max_inflight_msgs)
        self.is_learner = is_learner

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.value} match={self.match} next={self.next}"
            f"{' learner' if self.is_learner else ''}"
            f"{f' snap={self.pending_snapshot}' if self.pending_snapshot else ''}"
            f"{' paused' if self.is_paused() else ''})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.msg_app_flow_paused = False
        self.pending_snapshot = 0
        self.snapshot = None
        self.snapshot_offset = 0
        self.snapshot_acked = False
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        # Coming back from a snapshot, the follower has at least the snapshot's entries.
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot.metadata.index
        self.snapshot = snapshot

    def sent_entries(self, count: int, last_index: int) -> None:
        """Record that an AppendEntries with ``count`` entries ending at ``last_index`` left."""
        if self.state is ProgressState.REPLICATE:
            if count > 0:
                self.next = last_index + 1
                self.inflights.add(last_index)
        elif self.state is ProgressState.PROBE:
            self.msg_app_flow_paused = True
        else:
            raise InvariantViolation(f"sending entries in state {self.state}")

    def maybe_update(self, n: int) -> bool:
        """An acknowledgement of index ``n`` arrived. Returns True if ``match`` advanced."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.msg_app_flow_paused = False
        self.next = max(self.next, n + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an AppendEntries whose previous index was ``rejected``.

        ``match_hint`` is where the follower suggests its log may match. Returns False if the
        rejection is stale (it answers an older message) and must be ignored.
        """
        if self.state is ProgressState.REPLICATE:
            # In REPLICATE we only ever sent from match+1 on; a rejection of anything at or
            # below match is a stale, reordered response.
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        # In PROBE, only the rejection of the last probe (prev index = next - 1) is current.
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1, 1)
        self.msg_app_flow_paused = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.msg_app_flow_paused
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True  # SNAPSHOT: only snapshot chunks flow


class VoteResult(enum.Enum):
    PENDING = "pending"
    WON = "won"
    LOST = "lost"


class ProgressTracker:
    """The configuration (voters, learners) and every member's Progress.

    Membership changes are single-server (thesis §4.1), so there is one voter set at a time and
    a quorum is a simple majority of it.
    """

    __slots__ = ("learners", "max_inflight_msgs", "progress", "voters", "votes")

    def __init__(self, max_inflight_msgs: int) -> None:
        self.max_inflight_msgs = max_inflight_msgs
        self.voters: frozenset[int] = frozenset()
        self.learners: frozenset[int] = frozenset()
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}

    def conf_state(self) -> ConfState:
        return ConfState.of(self.voters, self.learners)

    def apply_conf(self, cs: ConfState, next_index: int) -> None:
        """Switch to configuration ``cs``, keeping the progress of members that stay."""
        self.voters = frozenset(cs.voters)
        self.learners = frozenset(cs.learners)
        members = self.voters | self.learners
        for nid in list(self.progress):
            if nid not in members:
                del self.progress[nid]
        for nid in members:
            pr = self.progress.get(nid)
            if pr is None:
                pr = Progress(next_index, self.max_inflight_msgs, nid in self.learners)
                # A member just added counts as active so that CheckQuorum does not depose
                # the leader before the newcomer had a chance to answer.
                pr.recent_active = True
                self.progress[nid] = pr
            pr.is_learner = nid in self.learners

    def is_voter(self, nid: int) -> bool:
        return nid in self.voters

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def committed_index(self) -> int:
        """The highest index replicated on a majority of voters (thesis §3.6).

        With the voters' match indexes sorted descending, the quorum-th is on a majority.
        """
        if not self.voters:
            # No voters: nothing can be committed by counting. (Only transiently possible.)
            return 0
        matches = sorted((self.progress[v].match for v in self.voters), reverse=True)
        return matches[self.quorum() - 1]

    def reset_votes(self) -> None:
        self.votes = {}

    def record_vote(self, nid: int, granted: bool) -> None:
        self.votes.setdefault(nid, granted)

    def tally_votes(self) -> tuple[int, int, VoteResult]:
        granted = sum(1 for v in self.voters if self.votes.get(v) is True)
        rejected = sum(1 for v in self.voters if self.votes.get(v) is False)
        q = self.quorum()
        if granted >= q:
            return granted, rejected, VoteResult.WON
        if len(self.voters) - rejected < q:
            return granted, rejected, VoteResult.LOST
        return granted, rejected, VoteResult.PENDING

    def quorum_active(self) -> bool:
        """Whether a majority of voters was heard from recently (CheckQuorum, thesis §6.2)."""
        active = sum(1 for v in self.voters if self.progress[v].recent_active)
        return active >= self.quorum()

    def reset_recent_active(self, self_id: int) -> None:
        for nid, pr in self.progress.items():
            pr.recent_active = nid == self_id
