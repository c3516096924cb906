"""The Raft consensus state machine: pure, synchronous, deterministic.

This module is the heart of dkv. It implements Raft as described in Diego Ongaro's PhD thesis
"Consensus: Bridging Theory and Practice" (2014), cited as "thesis §N", in the style of
etcd-io/raft: the only entrances are :meth:`Raft.step` (a message, from the network or a local
action) and :meth:`Raft.tick` (one unit of logical time). It performs no I/O, reads no clock,
and draws randomness only from the RNG handed in. Output accumulates in ``msgs`` and
``read_states`` and is collected by :class:`dkv.raft.rawnode.RawNode` into a ``Ready``.

Choices, each with its thesis section:

- Elections with randomized timeouts in ``[T, 2T)`` ticks (§3.4), PreVote (§9.6) so a node
  returning from a partition cannot force a term change, and the "leader stickiness" rule
  (§4.2.3): a node that heard from a leader within the minimum election timeout ignores
  (Pre)Vote requests, unless the request comes from a leadership transfer.
- CheckQuorum (§6.2): a leader that has not heard from a quorum in an election timeout steps
  down, so an isolated leader stops serving (stale) lease reads and accepting writes.
- Log replication (§3.5) with fast conflict backtracking by term, pipelining and flow control
  (§10.2.1; see progress.py), batching of proposals into one AppendEntries.
- Commit only entries of the current term by counting replicas (§3.6.2, figure 3.7).
- Log compaction with snapshots and a chunked InstallSnapshot (§5.1, figure 5.3).
- Membership change ONE SERVER AT A TIME (§4.1), with etcd's rule that a configuration takes
  effect when its entry is *applied*, and at most one unapplied configuration entry in the log.
  A new leader may not propose a change until its own no-op entry is applied, which also covers
  the single-server bug Ongaro reported in 2015 (a leader must commit an entry of its term
  before changing the configuration). Learners (non-voting members, §4.2.1 "catching up new
  servers") replicate but never vote, campaign or count toward a quorum.
- Leadership transfer (§3.10) with TimeoutNow.
- Linearizable reads with ReadIndex (§6.4) or leader leases (§6.4.1), at the leader or
  forwarded from followers ("follower reads", §6.4's last paragraphs).
"""

from __future__ import annotations

import enum
from typing import Protocol

from dkv.errors import (
    Compacted,
    ConfChangeRejected,
    DkvError,
    InvariantViolation,
    NotLeader,
    Overloaded,
    ProposalDropped,
    ReadIndexDropped,
    SnapshotTemporarilyUnavailable,
)
from dkv.raft.config import Config, ReadOnlyOption
from dkv.raft.log import RaftLog
from dkv.raft.progress import Progress, ProgressState, ProgressTracker, VoteResult
from dkv.raft.read_only import ReadOnly
from dkv.raft.storage import Storage
from dkv.raft.types import (
    ENTRY_OVERHEAD_BYTES,
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Role,
    Snapshot,
    SnapshotChunk,
    SoftState,
)

__all__ = ["CampaignType", "Logger", "NullLogger", "Raft", "RandomSource"]

MT = MessageType
TRANSFER_CONTEXT = b"transfer"


class RandomSource(Protocol):
    """The slice of ``random.Random`` the core uses. Handed in so runs are reproducible."""

    def randrange(self, start: int, stop: int) -> int: ...


class Logger(Protocol):
    """The slice of ``logging.Logger`` the core uses."""

    def debug(self, msg: str, *args: object) -> None: ...

    def info(self, msg: str, *args: object) -> None: ...

    def warning(self, msg: str, *args: object) -> None: ...


class NullLogger:
    """A logger that discards everything (the default: the core must not touch global state)."""

    def debug(self, msg: str, *args: object) -> None:
        pass

    def info(self, msg: str, *args: object) -> None:
        pass

    def warning(self, msg: str, *args: object) -> None:
        pass


class CampaignType(enum.Enum):
    PRE_ELECTION = "pre-election"  # PreVote round: does not increase the term (thesis §9.6)
    ELECTION = "election"  # a normal election
    TRANSFER = "transfer"  # ordered by TimeoutNow: skip PreVote and the stickiness check


class Raft:
    """One member of one Raft group. See the module docstring."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        rng: RandomSource,
        logger: Logger | None = None,
    ) -> None:
        config.validate()
        self.cfg = config
        self.id = config.id
        self.rng = rng
        self.logger: Logger = logger if logger is not None else NullLogger()
        self.log = RaftLog(storage, config.max_committed_bytes_per_ready)
        self.trk = ProgressTracker(config.max_inflight_msgs)

        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.role = Role.FOLLOWER

        # Outputs, drained by RawNode.ready(). Bounded in practice by flow control: at most
        # one AppendEntries per in-flight slot per peer, one heartbeat per peer per beat.
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []

        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_timeout_ticks
        # Ticks since start: the leader's clock for leases (§6.4.1). Never persisted, never
        # compared across nodes; only differences on this node matter.
        self.tick_count = 0

        self.lead_transferee = NONE
        # Index of the last configuration entry in the log; a new one may be proposed only
        # once the state machine has applied up to it.
        self.pending_conf_index = 0
        self.uncommitted_bytes = 0
        self.read_only = ReadOnly(config.max_pending_read_index)
        # ReadIndex requests that arrived before this leader committed an entry of its term.
        self.pending_read_index_msgs: list[Message] = []
        # Chunks of an incoming snapshot (follower side of InstallSnapshot).
        self.incoming_snapshot: tuple[Snapshot, bytearray] | None = None

        hs, cs = storage.initial_state()
        self.trk.apply_conf(cs, self.log.last_index() + 1)
        if not hs.is_empty():
            self._load_state(hs)
        if config.applied_index > 0:
            self.log.applied_to(config.applied_index)
        self.become_follower(self.term, NONE)
        self.logger.info(
            "raft %d: start term=%d commit=%d applied=%d last=%d voters=%s learners=%s",
            self.id,
            self.term,
            self.log.committed,
            self.log.applied,
            self.log.last_index(),
            sorted(cs.voters),
            sorted(cs.learners),
        )

    # ------------------------------------------------------------------------------------------
    # State snapshots for the RawNode and for tests

    def soft_state(self) -> SoftState:
        return SoftState(leader_id=self.lead, role=self.role)

    def hard_state(self) -> HardState:
        return HardState(term=self.term, vote=self.vote, commit=self.log.committed)

    def promotable(self) -> bool:
        """Whether this node may campaign: it is a voter of the configuration it knows.

        A learner, a removed node, or a new node that has not yet learned the configuration
        never starts an election."""
        return self.id in self.trk.voters

    def _load_state(self, hs: HardState) -> None:
        if hs.commit < self.log.committed or hs.commit > self.log.last_index():
            raise InvariantViolation(
                f"hard state commit {hs.commit} out of range "
                f"[{self.log.committed}, {self.log.last_index()}]"
            )
        self.log.committed = hs.commit
        self.term = hs.term
        self.vote = hs.vote

    # ------------------------------------------------------------------------------------------
    # Role transitions

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_election_timeout()
        self.abort_leader_transfer()
        self.trk.reset_votes()
        last = self.log.last_index()
        for nid, pr in self.trk.progress.items():
            fresh = Progress(last + 1, self.cfg.max_inflight_msgs, pr.is_learner)
            if nid == self.id:
                fresh.match = last
                # We always hear from ourselves: without this a new leader with only a bare
                # quorum alive fails its first CheckQuorum (found by the simulator).
                fresh.recent_active = True
            self.trk.progress[nid] = fresh
        self.pending_conf_index = 0
        self.uncommitted_bytes = 0
        self.read_only = ReadOnly(self.cfg.max_pending_read_index)
        self.pending_read_index_msgs = []

    def _reset_randomized_election_timeout(self) -> None:
        # Randomized in [T, 2T) so that split votes are rare and resolve quickly (thesis §3.4).
        t = self.cfg.election_timeout_ticks
        self.randomized_election_timeout = t + self.rng.randrange(0, t)

    def become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        self.logger.debug("raft %d: follower at term %d (leader %d)", self.id, term, lead)

    def become_pre_candidate(self) -> None:
        if self.role is Role.LEADER:
            raise InvariantViolation("leader cannot become pre-candidate")
        # PreVote does not change term or vote: only a real election does (thesis §9.6).
        self.trk.reset_votes()
        self.lead = NONE
        self.role = Role.PRE_CANDIDATE
        self.logger.debug("raft %d: pre-candidate at term %d", self.id, self.term)

    def become_candidate(self) -> None:
        if self.role is Role.LEADER:
            raise InvariantViolation("leader cannot become candidate")
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self.logger.debug("raft %d: candidate at term %d", self.id, self.term)

    def become_leader(self) -> None:
        if self.role is Role.FOLLOWER:
            raise InvariantViolation("follower cannot become leader without an election")
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        # Our own progress is always in REPLICATE: we hold every entry we append.
        self.trk.progress[self.id].become_replicate()
        # Append a no-op of the new term: entries of earlier terms can only be committed
        # indirectly, by committing one of ours (thesis §3.6.2), and ReadIndex needs the
        # leader to know the commit index of its term (§6.4 step 1).
        noop_index = self.log.last_index() + 1
        self._append_entries([Entry(term=self.term, index=noop_index)], count_size=False)
        self.pending_conf_index = noop_index
        self.logger.info("raft %d: leader at term %d", self.id, self.term)

    # ------------------------------------------------------------------------------------------
    # Time

    def tick(self) -> None:
        self.tick_count += 1
        if self.role is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    def _past_election_timeout(self) -> bool:
        return self.election_elapsed >= self.randomized_election_timeout

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self._past_election_timeout():
            self.election_elapsed = 0
            self.step(Message(MT.HUP, frm=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.cfg.election_timeout_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum:
                self.step(Message(MT.CHECK_QUORUM, frm=self.id))
            # A transfer that did not finish within an election timeout is abandoned, so the
            # leader resumes accepting proposals (thesis §3.10).
            if self.role is Role.LEADER and self.lead_transferee != NONE:
                self.abort_leader_transfer()
        if self.role is not Role.LEADER:
            return
        if self.heartbeat_elapsed >= self.cfg.heartbeat_interval_ticks:
            self.heartbeat_elapsed = 0
            self.step(Message(MT.BEAT, frm=self.id))

    # ------------------------------------------------------------------------------------------
    # Sending

    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def _msg(self, t: MessageType, to: int, **fields: object) -> Message:
        """A message from us, stamped with our term unless the caller sets ``term``."""
        if "term" not in fields:
            fields["term"] = self.term
        return Message(t, to=to, frm=self.id, **fields)  # type: ignore[arg-type]

    def send_append(self, to: int, send_if_empty: bool = True) -> bool:
        """Send entries from ``next`` to follower ``to``, or a snapshot if they are compacted.

        Returns whether a message was sent."""
        pr = self.trk.progress[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        try:
            prev_term = self.log.term(prev_index)
            ents = self.log.entries_from(pr.next, self.cfg.max_msg_bytes)
        except Compacted:
            return self._start_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self._send(
            self._msg(
                MT.APP,
                to,
                index=prev_index,
                log_term=prev_term,
                entries=tuple(ents),
                commit=self.log.committed,
            )
        )
        pr.sent_entries(len(ents), ents[-1].index if ents else prev_index)
        return True

    def _send_empty_append(self, to: int, pr: Progress) -> None:
        prev_index = pr.next - 1
        try:
            prev_term = self.log.term(prev_index)
        except Compacted:
            pr.become_probe()
            self.send_append(to)
            return
        self._send(
            self._msg(MT.APP, to, index=prev_index, log_term=prev_term, commit=self.log.committed)
        )

    def bcast_append(self) -> None:
        for nid in self.trk.progress:
            if nid != self.id:
                self.send_append(nid)

    def _commit_and_announce(self) -> bool:
        """Advance the commit index to what a quorum holds; if it moved, serve the reads that
        waited for a commit of this term and tell the followers (bcast_commit)."""
        before = self.log.committed
        if not self.maybe_commit():
            return False
        self._release_pending_read_index()
        self.bcast_commit(before)
        return True

    def bcast_commit(self, before: int) -> None:
        """The commit index moved past ``before``. A follower with entries to receive gets them
        now, and the append carries the new commit index; the others learn it from the next
        append or heartbeat rather than from an empty append of its own (and its
        acknowledgement): at one write in flight those were four of the ten messages of a
        put, and an entry is durable and answered once the leader applies it, whatever the
        followers know.

        Except a configuration change (or a new leader's no-op, which ``pending_conf_index``
        also marks): it takes effect where it is *applied* (thesis §4.1), so every member is
        told at once. A leader that fails right after committing one would otherwise leave
        members that never applied it, deciding elections with the old configuration (seen:
        a group grown from one replica to three could not elect once the first one left)."""
        urgent = before < self.pending_conf_index <= self.log.committed
        for nid in self.trk.progress:
            if nid != self.id:
                self.send_append(nid, send_if_empty=urgent)

    def _send_heartbeat(self, to: int, ctx: bytes) -> None:
        # Never tell a follower to commit beyond what we know it holds: its log may still
        # diverge from ours after ``match`` (etcd-io/raft does the same).
        commit = min(self.trk.progress[to].match, self.log.committed)
        # ``index`` carries our tick count; the follower echoes it so we know which round an
        # acknowledgement answers, which is what bounds the lease (see _lease_valid).
        self._send(self._msg(MT.HEARTBEAT, to, index=self.tick_count, commit=commit, context=ctx))

    def bcast_heartbeat(self, ctx: bytes | None = None) -> None:
        if ctx is None:
            ctx = self.read_only.last_pending_request_ctx()
        for nid, pr in self.trk.progress.items():
            if nid == self.id:
                continue
            self._send_heartbeat(nid, ctx)
            # Retransmit a snapshot chunk when nothing was acknowledged during the last
            # heartbeat interval (lost or delayed); acknowledged chunks pull the next one.
            if pr.state is ProgressState.SNAPSHOT:
                if not pr.snapshot_acked:
                    self._send_snapshot_chunk(nid, pr)
                pr.snapshot_acked = False

    # -- snapshots (leader side of InstallSnapshot, thesis §5.1 and figure 5.3) --------------

    def _start_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            # Do not start an expensive transfer to a peer we have not heard from.
            return False
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            self.logger.debug("raft %d: snapshot for %d temporarily unavailable", self.id, to)
            return False
        if snap.is_empty():
            raise InvariantViolation("need a snapshot to send but the snapshot is empty")
        pr.become_snapshot(snap)
        self.logger.debug(
            "raft %d: sending snapshot %d to %d (%d bytes)",
            self.id,
            snap.metadata.index,
            to,
            len(snap.data),
        )
        self._send_snapshot_chunk(to, pr)
        return True

    def _send_snapshot_chunk(self, to: int, pr: Progress) -> None:
        # Always the snapshot the transfer started with, even if a newer one was taken since:
        # restarting on every new snapshot livelocks a multi-chunk transfer on a lossy link
        # while the leader snapshots often (found by the simulator). The follower catches up
        # from the pinned snapshot with entries, or with another snapshot if those were
        # compacted meanwhile -- either way each transfer moves it forward.
        snap = pr.snapshot
        if snap is None:
            raise InvariantViolation(f"no snapshot pinned for {to} in state {pr.state}")
        offset = pr.snapshot_offset
        data = snap.data[offset : offset + self.cfg.snapshot_chunk_bytes]
        done = offset + len(data) >= len(snap.data)
        chunk = SnapshotChunk(
            metadata=snap.metadata,
            offset=offset,
            data=data,
            done=done,
            total_bytes=len(snap.data),
        )
        self._send(self._msg(MT.SNAP, to, index=snap.metadata.index, snapshot=chunk))

    # ------------------------------------------------------------------------------------------
    # Appending and committing (leader)

    def _append_entries(self, ents: list[Entry], count_size: bool = True) -> None:
        if count_size:
            size = sum(len(e.data) for e in ents) + ENTRY_OVERHEAD_BYTES * len(ents)
            limit = self.cfg.max_uncommitted_entries_bytes
            # Always admit one batch when nothing is uncommitted, so a single large entry
            # cannot block the log forever.
            if limit > 0 and self.uncommitted_bytes > 0 and self.uncommitted_bytes + size > limit:
                raise Overloaded(
                    f"uncommitted log tail would exceed {limit} bytes; retry when it commits"
                )
            self.uncommitted_bytes += size
        self.log.append(ents)
        # Our own match moves only once the host has written these entries (on_persisted):
        # the host sends our appends while its own write is in flight (thesis §10.2.1), so
        # counting them now could commit an entry that a quorum does not hold durably.

    def propose_entries(self, datas: list[bytes], types: list[EntryType] | None = None) -> int:
        """Leader only: append one entry per payload. Returns the index of the last one."""
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        self._check_can_propose()
        li = self.log.last_index()
        t = self.term
        if types is None:
            ents = [Entry(t, li + 1 + i, EntryType.NORMAL, d) for i, d in enumerate(datas)]
        else:
            ents = [
                Entry(t, li + 1 + i, et, d)
                for i, (d, et) in enumerate(zip(datas, types, strict=True))
            ]
        self._append_entries(ents)
        self.bcast_append()
        return li + len(ents)

    def _check_can_propose(self) -> None:
        if self.id not in self.trk.progress:
            raise ProposalDropped("this node was removed from the group")
        if self.lead_transferee != NONE:
            raise ProposalDropped(
                f"leadership transfer to {self.lead_transferee} in progress (thesis §3.10)"
            )

    def maybe_commit(self) -> bool:
        return self.log.maybe_commit(self.trk.committed_index(), self.term)

    def on_persisted(self, index: int, term: int) -> None:
        """The host wrote our log up to ``index`` (whose entry has ``term``) to stable storage.

        A leader writes its log in parallel with replicating it (thesis §10.2.1) and counts its
        own copy toward a commit only from here on: like a follower's acknowledgement, but for
        ourselves. A single-voter group commits here.

        (With one Ready in flight at a time, as our hosts work, an entry counted early could
        not leak anyway: whatever a commit produces waits for the next Ready, after the
        write. The rule keeps the core safe for a host that pipelines its writes.)"""
        if self.role is not Role.LEADER:
            return
        pr = self.trk.progress.get(self.id)
        if pr is None or self.log.term_or_zero(index) != term:
            return  # removed from the group, or the entry was replaced since
        if pr.maybe_update(index):
            self._commit_and_announce()

    def committed_entry_in_current_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    # ------------------------------------------------------------------------------------------
    # Elections

    def _hup(self, t: CampaignType) -> None:
        if self.role is Role.LEADER:
            return
        if not self.promotable():
            self.logger.debug("raft %d: not promotable, ignoring campaign", self.id)
            return
        # Do not campaign while a configuration change is committed but not applied: we may
        # be about to learn that we are no longer a voter.
        if self.log.has_next_committed_entries():
            pending = self.log.slice(self.log.applied + 1, self.log.committed + 1, None)
            if any(e.type is EntryType.CONF_CHANGE for e in pending):
                self.logger.debug("raft %d: unapplied conf change, not campaigning", self.id)
                return
        self.campaign(t)

    def campaign(self, t: CampaignType) -> None:
        if t is CampaignType.PRE_ELECTION:
            self.become_pre_candidate()
            vote_type = MT.PRE_VOTE
            term = self.term + 1  # the term we would campaign for; not adopted yet
        else:
            self.become_candidate()
            vote_type = MT.VOTE
            term = self.term
        self.trk.record_vote(self.id, True)
        if self._poll_result() is VoteResult.WON:
            # A single-voter group wins at once.
            if t is CampaignType.PRE_ELECTION:
                self.campaign(CampaignType.ELECTION)
            else:
                self.become_leader()
            return
        ctx = TRANSFER_CONTEXT if t is CampaignType.TRANSFER else b""
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        for nid in sorted(self.trk.voters):
            if nid == self.id:
                continue
            self._send(
                self._msg(
                    vote_type, nid, term=term, index=last_index, log_term=last_term, context=ctx
                )
            )

    def _poll_result(self) -> VoteResult:
        return self.trk.tally_votes()[2]

    def _poll(self, frm: int, granted: bool) -> VoteResult:
        self.trk.record_vote(frm, granted)
        return self._poll_result()

    # ------------------------------------------------------------------------------------------
    # Step: the one entrance for messages

    def step(self, m: Message) -> None:
        """Process one message. Raises the DkvError of a rejected local request
        (NotLeader, ProposalDropped, ReadIndexDropped); network messages never raise except on
        an invariant breach."""
        # 1. Term handling (thesis §3.3: a higher term makes us a follower; lower is stale).
        if m.term == 0:
            pass  # local message, or a forwarded proposal / read request
        elif m.term > self.term:
            if m.type in (MT.VOTE, MT.PRE_VOTE):
                force = m.context == TRANSFER_CONTEXT
                in_lease = (
                    self.cfg.check_quorum
                    and self.lead != NONE
                    and self.election_elapsed < self.cfg.election_timeout_ticks
                )
                if not force and in_lease:
                    # Leader stickiness (thesis §4.2.3): we heard from a live leader within
                    # the minimum election timeout, so this candidate is disruptive.
                    self.logger.debug(
                        "raft %d: ignoring %s from %d at term %d: leader %d is live",
                        self.id,
                        m.type.name,
                        m.frm,
                        m.term,
                        self.lead,
                    )
                    return
            if m.type is MT.PRE_VOTE:
                pass  # a PreVote never changes our term
            elif m.type is MT.PRE_VOTE_RESP and not m.reject:
                pass  # the future term of our own pre-campaign; adopted if we win
            elif m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if m.type in (MT.HEARTBEAT, MT.APP):
                # A leader from an old term is talking to us: reject with our term (thesis
                # §3.3). It may be that *we* were partitioned and bumped our term (possible
                # without PreVote); the answer makes the stale leader step down so the group
                # elects again instead of leaving us out for good. (etcd-io/raft answers only
                # with PreVote or CheckQuorum on; without them, a voter partitioned across a
                # membership change, whose votes go to removed members, never rejoined --
                # found by the simulator.)
                self._send(self._msg(MT.APP_RESP, m.frm))
            elif m.type is MT.PRE_VOTE:
                # Tell the pre-candidate our term so it can catch up (thesis §9.6).
                self._send(self._msg(MT.PRE_VOTE_RESP, m.frm, reject=True))
            return  # otherwise: stale, ignore

        # 2. Messages handled the same way in every role.
        t = m.type
        if t is MT.HUP:
            self._hup(CampaignType.PRE_ELECTION if self.cfg.pre_vote else CampaignType.ELECTION)
            return
        if t in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(m)
            return

        # 3. Role-specific handling.
        try:
            match self.role:
                case Role.LEADER:
                    self._step_leader(m)
                case Role.CANDIDATE | Role.PRE_CANDIDATE:
                    self._step_candidate(m)
                case Role.FOLLOWER:
                    self._step_follower(m)
        except DkvError as exc:
            # Our own requests learn why they failed. A request forwarded by a peer (a
            # proposal or a read that arrived after we lost leadership, or during a transfer)
            # is dropped: the peer's client times out and retries, exactly as if the message
            # had been lost, which Raft tolerates anyway.
            if m.frm in (NONE, self.id):
                raise
            self.logger.debug("raft %d: dropped %s from %d: %s", self.id, m.type.name, m.frm, exc)

    def _handle_vote_request(self, m: Message) -> None:
        # We can vote for m.frm if we already did (a retransmission), or if we have not voted
        # and know no leader this term; a PreVote for a later term is always considered,
        # since it changes nothing (thesis §9.6).
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.type is MT.PRE_VOTE and m.term > self.term)
        )
        resp = MT.VOTE_RESP if m.type is MT.VOTE else MT.PRE_VOTE_RESP
        # Election restriction (thesis §3.6.1): only a candidate whose log is at least as
        # up-to-date as ours may get our vote, so every leader holds all committed entries.
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # Answer with the candidate's term: for a PreVote ours may be lower, and the
            # pre-candidate must count this as a grant for the term it is about to enter.
            self._send(self._msg(resp, m.frm, term=m.term))
            if m.type is MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(self._msg(resp, m.frm, reject=True))

    # -- leader ------------------------------------------------------------------------------

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t is MT.BEAT:
            self.bcast_heartbeat()
            return
        if t is MT.CHECK_QUORUM:
            if not self.trk.quorum_active():
                self.logger.warning(
                    "raft %d: stepping down at term %d: no quorum heard from", self.id, self.term
                )
                self.become_follower(self.term, NONE)
                return
            self.trk.reset_recent_active(self.id)
            return
        if t is MT.PROP:
            self._leader_propose(m)
            return
        if t is MT.READ_INDEX:
            self._leader_read_index(m)
            return
        if t is MT.TRANSFER_LEADER:
            self._leader_transfer(m)
            return

        pr = self.trk.progress.get(m.frm)
        if pr is None:
            return  # a message from a node that is not (or no longer) a member
        if t is MT.APP_RESP:
            pr.recent_active = True
            self._handle_append_response(m, pr)
        elif t is MT.HEARTBEAT_RESP:
            pr.recent_active = True
            self._handle_heartbeat_response(m, pr)
        elif t is MT.SNAP_RESP:
            pr.recent_active = True
            self._handle_snapshot_response(m, pr)
        elif t is MT.SNAP_STATUS:
            # The transport failed to deliver a snapshot chunk: probe again later.
            if pr.state is ProgressState.SNAPSHOT and m.reject:
                pr.become_probe()
                pr.msg_app_flow_paused = True
        elif t is MT.UNREACHABLE and pr.state is ProgressState.REPLICATE:
            # Optimistic pipelining to an unreachable peer only loses messages; fall back to
            # probing (one message per heartbeat) until it answers.
            pr.become_probe()

    def _leader_propose(self, m: Message) -> None:
        if not m.entries:
            raise InvariantViolation("proposal without entries")
        self._check_can_propose()
        li = self.log.last_index()
        ents: list[Entry] = []
        for i, e in enumerate(m.entries):
            et = e.type
            data = e.data
            if et is EntryType.CONF_CHANGE:
                try:
                    self._check_conf_change(ConfChange.decode(data))
                except ConfChangeRejected as exc:
                    if m.frm == self.id:
                        raise
                    # A forwarded conf change we must refuse: keep the slot as a no-op so the
                    # other entries of the batch keep their relative order.
                    self.logger.warning("raft %d: refusing forwarded conf change: %s", self.id, exc)
                    et, data = EntryType.NORMAL, b""
                else:
                    self.pending_conf_index = li + 1 + i
            ents.append(Entry(self.term, li + 1 + i, et, data))
        self._append_entries(ents)
        self.bcast_append()

    def _check_conf_change(self, cc: ConfChange) -> None:
        """Validate a membership change against the current configuration (leader side)."""
        if self.pending_conf_index > self.log.applied:
            raise ConfChangeRejected(
                f"a configuration change is pending (index {self.pending_conf_index}, "
                f"applied {self.log.applied}); one change at a time (thesis §4.1)"
            )
        if cc.node_id <= 0:
            raise ConfChangeRejected(f"invalid node id {cc.node_id}")
        voters, learners = self.trk.voters, self.trk.learners
        if cc.type is ConfChangeType.ADD_NODE and cc.node_id in voters:
            raise ConfChangeRejected(f"node {cc.node_id} is already a voter")
        if cc.type is ConfChangeType.ADD_LEARNER:
            if cc.node_id in voters:
                raise ConfChangeRejected(
                    f"node {cc.node_id} is a voter; demoting a voter to learner is not supported"
                )
            if cc.node_id in learners:
                raise ConfChangeRejected(f"node {cc.node_id} is already a learner")
        if cc.type is ConfChangeType.REMOVE_NODE:
            if cc.node_id not in voters and cc.node_id not in learners:
                raise ConfChangeRejected(f"node {cc.node_id} is not a member")
            if voters == {cc.node_id}:
                raise ConfChangeRejected("cannot remove the last voter")

    def _handle_append_response(self, m: Message, pr: Progress) -> None:
        if m.reject:
            # Fast backtracking (thesis §3.5): the follower told us the last index at or
            # before the rejected one whose term is <= the term we sent; jump to the last
            # entry in our log with a term <= that one.
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self.send_append(m.frm)
            return

        old_paused = pr.is_paused()
        updated = pr.maybe_update(m.index)
        snapshot_done = pr.state is ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot
        if not updated and not snapshot_done:
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT:
            if pr.match + 1 >= self.log.first_index():
                # The follower installed the snapshot (or caught up otherwise): resume entries.
                pr.become_probe()
                pr.become_replicate()
            elif snapshot_done:
                # It holds the pinned snapshot, but our log was compacted past it meanwhile:
                # probe, which finds the entries compacted and starts a newer snapshot.
                pr.become_probe()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)

        if not self._commit_and_announce() and old_paused:
            # The window reopened: the follower may be missing entries we held back.
            self.send_append(m.frm)
        # Fill the window with everything else we have (pipelining).
        while self.send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            # The transferee caught up: tell it to start an election now (thesis §3.10).
            self._send_timeout_now(m.frm)

    def _handle_heartbeat_response(self, m: Message, pr: Progress) -> None:
        pr.lease_ack_tick = max(pr.lease_ack_tick, m.index)
        if pr.state is ProgressState.PROBE:
            # The follower is alive: allow one more probe (the last one may have been lost).
            pr.msg_app_flow_paused = False
        if (
            pr.state is not ProgressState.SNAPSHOT
            and pr.match < self.log.last_index()
            and not self.send_append(m.frm)
            and pr.state is ProgressState.REPLICATE
        ):
            # The in-flight window is full. If every message in it was lost, no answer will
            # ever free it: send one empty append outside the window. A follower that missed
            # entries rejects it and we fall back to probing; otherwise it just acknowledges.
            self._send_empty_append(m.frm, pr)
        if not m.context:
            return
        acks = self.read_only.recv_ack(m.frm, m.context)
        if acks is None:
            return
        if sum(1 for v in self.trk.voters if v in acks) < self.trk.quorum():
            return
        for status in self.read_only.advance(m.context):
            self._respond_read_index(status.request, status.index)

    def _handle_snapshot_response(self, m: Message, pr: Progress) -> None:
        if pr.state is not ProgressState.SNAPSHOT or m.index != pr.pending_snapshot:
            return  # stale: a response to a transfer we gave up on
        if m.reject:
            # The follower refused (e.g. too large for it): give up and probe later.
            self.logger.warning("raft %d: %d rejected snapshot %d", self.id, m.frm, m.index)
            pr.become_probe()
            pr.msg_app_flow_paused = True
            return
        # ``reject_hint`` carries the follower's next expected byte offset.
        hint = m.reject_hint
        if hint == pr.snapshot_offset:
            return  # a duplicate acknowledgement; the chunk after it is already in flight
        # Forward, or back to wherever the follower says it is (it lost its buffer in a
        # crash). A reordered, stale acknowledgement costs one extra round: the follower
        # answers the resent chunk with its real offset.
        pr.snapshot_acked = True
        pr.snapshot_offset = hint
        self._send_snapshot_chunk(m.frm, pr)

    def _leader_read_index(self, m: Message) -> None:
        if len(self.trk.voters) == 1 and self.id in self.trk.voters:
            # Alone, we are trivially the leader; the commit index is current.
            self._respond_read_index(m, self.log.committed)
            return
        if not self.committed_entry_in_current_term():
            # Until our no-op commits we do not know the commit index of our term (§6.4 step 1).
            if len(self.pending_read_index_msgs) >= self.cfg.max_pending_read_index:
                self._drop_read(m, "too many read requests waiting for the leader's first commit")
                return
            self.pending_read_index_msgs.append(m)
            return
        self._serve_read_index(m)

    def _serve_read_index(self, m: Message) -> None:
        if self.cfg.read_only_option is ReadOnlyOption.LEASE_BASED and self._lease_valid():
            self._respond_read_index(m, self.log.committed)
            return
        # No valid lease (or SAFE reads): confirm leadership with a heartbeat round.
        if self.read_only.is_full():
            self._drop_read(m, f"more than {self.read_only.max_pending} reads pending")
            return
        if self.read_only.add_request(self.log.committed, m):
            self.read_only.recv_ack(self.id, m.context)
            self.bcast_heartbeat(m.context)

    def _lease_valid(self) -> bool:
        """Whether no other leader can exist now, judged by our own clock (thesis §6.4.1).

        A voter that acknowledged our heartbeat sent at tick ``s`` refuses every (Pre)Vote
        until it has gone an election timeout T without hearing from a leader (leader
        stickiness, §4.2.3); its timer may tick almost at once after our message arrives, so
        no rival can win before ``s + (T - 1)`` ticks. A rival needs a quorum, which overlaps
        every quorum that acknowledged, so the quorum-th newest acknowledged send tick bounds
        the lease. Our tick ``now`` may be up to one tick later in real time than counted, so
        the lease holds while ``now - s <= T - 2``. This assumes ticks of equal length on
        every node (bounded clock drift); it is why lease reads are an option, off by default.
        """
        if self.lead_transferee != NONE:
            return False  # we asked someone to take over, overriding stickiness
        now = self.tick_count
        acks = sorted(
            (now if v == self.id else self.trk.progress[v].lease_ack_tick for v in self.trk.voters),
            reverse=True,
        )
        oldest_in_quorum = acks[self.trk.quorum() - 1]
        return (
            oldest_in_quorum >= 0 and now - oldest_in_quorum <= self.cfg.election_timeout_ticks - 2
        )

    def _drop_read(self, m: Message, reason: str) -> None:
        if m.frm in (NONE, self.id):
            raise ReadIndexDropped(reason)
        self.logger.debug("raft %d: dropping read index from %d: %s", self.id, m.frm, reason)

    def _release_pending_read_index(self) -> None:
        if not self.pending_read_index_msgs or not self.committed_entry_in_current_term():
            return
        msgs, self.pending_read_index_msgs = self.pending_read_index_msgs, []
        for m in msgs:
            self._serve_read_index(m)

    def _respond_read_index(self, req: Message, index: int) -> None:
        if req.frm in (NONE, self.id):
            self.read_states.append(ReadState(index=index, request_ctx=req.context))
        else:
            self._send(self._msg(MT.READ_INDEX_RESP, req.frm, index=index, context=req.context))

    def _leader_transfer(self, m: Message) -> None:
        transferee = m.frm
        if transferee not in self.trk.voters:
            self.logger.info("raft %d: ignoring transfer to non-voter %d", self.id, transferee)
            return
        if transferee == self.lead_transferee:
            return  # already under way
        self.abort_leader_transfer()
        if transferee == self.id:
            return  # already leader
        # The transfer must finish within one election timeout (thesis §3.10).
        self.election_elapsed = 0
        self.lead_transferee = transferee
        pr = self.trk.progress[transferee]
        if pr.match == self.log.last_index():
            self._send_timeout_now(transferee)
        else:
            self.send_append(transferee)

    def _send_timeout_now(self, to: int) -> None:
        self._send(self._msg(MT.TIMEOUT_NOW, to))

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    # -- candidate ---------------------------------------------------------------------------

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        my_resp = MT.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MT.VOTE_RESP
        if t is MT.PROP:
            raise ProposalDropped("no leader: an election is in progress")
        if t in (MT.APP, MT.HEARTBEAT, MT.SNAP):
            # A leader of our term exists (thesis §3.4): step down and process its message.
            self.become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        if t is my_resp:
            result = self._poll(m.frm, not m.reject)
            if result is VoteResult.WON:
                if self.role is Role.PRE_CANDIDATE:
                    self.campaign(CampaignType.ELECTION)
                else:
                    self.become_leader()
                    self.bcast_append()
            elif result is VoteResult.LOST:
                # m.term may be higher than ours for a PreVote rejection (see step()).
                self.become_follower(self.term, NONE)
            return
        if t is MT.READ_INDEX and m.frm in (NONE, self.id):
            raise ReadIndexDropped("no leader: an election is in progress")
        # TIMEOUT_NOW (we are already campaigning), stray responses, etc.: ignore.

    # -- follower ----------------------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is MT.PROP:
            if self.lead == NONE:
                raise ProposalDropped("no leader known; retry after the election")
            if self.cfg.disable_proposal_forwarding:
                raise NotLeader(self.lead)
            self._send(Message(MT.PROP, to=self.lead, frm=self.id, entries=m.entries))
        elif t is MT.APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append_entries(m)
        elif t is MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_heartbeat(m)
        elif t is MT.SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot_chunk(m)
        elif t is MT.TRANSFER_LEADER:
            if self.lead == NONE:
                self.logger.info("raft %d: no leader to forward transfer request to", self.id)
                return
            self._send(Message(MT.TRANSFER_LEADER, to=self.lead, frm=m.frm, term=0))
        elif t is MT.TIMEOUT_NOW:
            # Ordered by the leader to take over (thesis §3.10): campaign at once, skipping
            # PreVote; the vote request carries a marker that overrides leader stickiness.
            self._hup(CampaignType.TRANSFER)
        elif t is MT.READ_INDEX:
            if self.lead == NONE:
                self._drop_read(m, "no leader known; retry after the election")
                return
            self._send(Message(MT.READ_INDEX, to=self.lead, frm=self.id, context=m.context))
        elif t is MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(index=m.index, request_ctx=m.context))

    def _handle_append_entries(self, m: Message) -> None:
        if m.index < self.log.committed:
            # Everything up to our commit index is settled; tell the leader where we are.
            self._send(self._msg(MT.APP_RESP, m.frm, index=self.log.committed))
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(self._msg(MT.APP_RESP, m.frm, index=last_new))
            return
        # Reject, with a hint for fast backtracking: the last index at or before the probed
        # one whose term is <= the leader's term for it (thesis §3.5).
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            self._msg(
                MT.APP_RESP,
                m.frm,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self.log.commit_to(min(m.commit, self.log.last_index()))
        self._send(self._msg(MT.HEARTBEAT_RESP, m.frm, index=m.index, context=m.context))

    def _handle_snapshot_chunk(self, m: Message) -> None:
        chunk = m.snapshot
        if chunk is None:
            raise InvariantViolation("SNAP message without a chunk")
        meta = chunk.metadata
        if meta.index <= self.log.committed:
            # We already have everything this snapshot covers.
            self.incoming_snapshot = None
            self._send(self._msg(MT.APP_RESP, m.frm, index=self.log.committed))
            return
        buf = self.incoming_snapshot
        same = buf is not None and buf[0].metadata == meta
        if chunk.offset == 0 and not same:
            # The first chunk of a new transfer. (A duplicated first chunk of the transfer
            # under way must not reset it: the leader has moved on.)
            if chunk.total_bytes > self.cfg.max_snapshot_bytes:
                self.logger.warning(
                    "raft %d: snapshot of %d bytes exceeds max_snapshot_bytes=%d",
                    self.id,
                    chunk.total_bytes,
                    self.cfg.max_snapshot_bytes,
                )
                self._send(self._msg(MT.SNAP_RESP, m.frm, index=meta.index, reject=True))
                return
            self.incoming_snapshot = (Snapshot(metadata=meta), bytearray())
            buf = self.incoming_snapshot
        if buf is None or buf[0].metadata != meta or len(buf[1]) != chunk.offset:
            # Out of order or duplicate: tell the leader which byte we expect next.
            expected = len(buf[1]) if buf is not None and buf[0].metadata == meta else 0
            self._send(self._msg(MT.SNAP_RESP, m.frm, index=meta.index, reject_hint=expected))
            return
        buf[1].extend(chunk.data)
        if not chunk.done:
            self._send(self._msg(MT.SNAP_RESP, m.frm, index=meta.index, reject_hint=len(buf[1])))
            return
        snap = Snapshot(metadata=meta, data=bytes(buf[1]))
        self.incoming_snapshot = None
        if self.restore(snap):
            self._send(self._msg(MT.APP_RESP, m.frm, index=self.log.last_index()))
        else:
            self._send(self._msg(MT.APP_RESP, m.frm, index=self.log.committed))

    def restore(self, snap: Snapshot) -> bool:
        """Install a snapshot from the leader (thesis §5.1, figure 5.3 receiver steps 6-8).

        Returns False if it was not needed (we already hold the entries it covers)."""
        meta = snap.metadata
        if meta.index <= self.log.committed:
            return False
        if self.role is not Role.FOLLOWER:
            raise InvariantViolation("only a follower installs snapshots")
        if self.log.match_term(meta.index, meta.term):
            # Our log already contains the snapshot's last entry: keep the log after it
            # (figure 5.3 step 6) and just fast-forward the commit index.
            self.log.commit_to(meta.index)
            return False
        self.log.restore(snap)
        self.trk.apply_conf(meta.conf_state, self.log.last_index() + 1)
        self.logger.info(
            "raft %d: restored snapshot index=%d term=%d", self.id, meta.index, meta.term
        )
        return True

    # ------------------------------------------------------------------------------------------
    # Membership

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed configuration entry (called by the host while applying)."""
        voters = set(self.trk.voters)
        learners = set(self.trk.learners)
        nid = cc.node_id
        if cc.type is ConfChangeType.ADD_NODE:
            learners.discard(nid)  # promotion of a learner, or a brand-new voter
            voters.add(nid)
        elif cc.type is ConfChangeType.ADD_LEARNER:
            if nid not in voters:
                learners.add(nid)
        elif cc.type is ConfChangeType.REMOVE_NODE and voters != {nid}:
            # Removing the last voter is refused at proposal time; ignore it here too.
            voters.discard(nid)
            learners.discard(nid)
        cs = ConfState.of(voters, learners)
        self._switch_to_config(cs)
        return cs

    def _switch_to_config(self, cs: ConfState) -> None:
        before = set(self.trk.progress)
        self.trk.apply_conf(cs, self.log.last_index() + 1)
        if self.role is not Role.LEADER:
            return
        if self.id not in self.trk.voters:
            # We were removed: with step_down_on_removal we stop leading at once; the others
            # elect a leader among the remaining voters (thesis §4.2.2).
            if self.cfg.step_down_on_removal:
                self.become_follower(self.term, NONE)
            return
        # The quorum may have shrunk, so more may be committed now.
        if not self._commit_and_announce():
            # Probe new members at once instead of letting them wait for a heartbeat.
            for nid in sorted(set(self.trk.progress) - before - {self.id}):
                self.send_append(nid)
        if self.lead_transferee != NONE and self.lead_transferee not in self.trk.voters:
            self.abort_leader_transfer()
