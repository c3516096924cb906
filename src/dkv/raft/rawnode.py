"""RawNode: the host-facing API of one Raft group member.

The host owns the loop (see ``docs/raft.md`` for a runnable example)::

    while running:
        on timer:       node.tick()
        on message:     node.step(msg)
        on request:     node.propose(data) / node.read_index(ctx) / ...
        if node.has_ready():
            rd = node.ready()
            persist(rd.snapshot, rd.entries, rd.hard_state)   # 1. durable first
            send(rd.messages)                                  # 2. then talk
            apply(rd.snapshot, rd.committed_entries)           # 3. then apply
            serve(rd.read_states)                              # 4. reads
            node.advance()                                     # 5. acknowledge

The rules behind each step are in :class:`dkv.raft.types.Ready`'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

from dkv.errors import InvalidArgument, InvariantViolation, NotLeader
from dkv.raft.config import Config
from dkv.raft.core import Logger, Raft, RandomSource
from dkv.raft.progress import Progress, ProgressState
from dkv.raft.storage import Storage
from dkv.raft.types import (
    ENTRY_OVERHEAD_BYTES,
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    Role,
    SoftState,
    is_local_message,
)

__all__ = ["PeerStatus", "RawNode", "Status"]


@dataclass(frozen=True, slots=True)
class PeerStatus:
    match: int
    next: int
    state: ProgressState
    is_learner: bool
    recent_active: bool


@dataclass(frozen=True, slots=True)
class Status:
    """A consistent view of one member, for admin APIs, metrics and tests."""

    id: int
    term: int
    vote: int
    commit: int
    applied: int
    last_index: int
    first_index: int
    leader_id: int
    role: Role
    lead_transferee: int
    conf_state: ConfState
    progress: dict[int, PeerStatus]


def _peer_status(pr: Progress) -> PeerStatus:
    return PeerStatus(pr.match, pr.next, pr.state, pr.is_learner, pr.recent_active)


class RawNode:
    """Thread-unsafe wrapper around :class:`Raft` producing :class:`Ready` batches."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        rng: RandomSource,
        logger: Logger | None = None,
    ) -> None:
        self.raft = Raft(config, storage, rng, logger)
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = self.raft.hard_state()
        self._seq = 0
        self._in_flight: Ready | None = None

    # -- driving the core -----------------------------------------------------------------------

    def tick(self) -> None:
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (tests and bootstrap; normally the election timer does it)."""
        self.raft.step(Message(MessageType.HUP, frm=self.raft.id))

    def step(self, m: Message) -> None:
        """Feed a message received from a peer."""
        if is_local_message(m.type):
            raise InvalidArgument(f"{m.type.name} is a local message and cannot come from a peer")
        if m.frm == NONE:
            raise InvalidArgument("message without a sender")
        if m.to != self.raft.id:
            raise InvalidArgument(f"message for {m.to} delivered to {self.raft.id}")
        self.raft.step(m)

    def propose(self, data: bytes) -> int | None:
        """Propose one entry. Returns its index when this node is the leader (it may still be
        lost if leadership changes before it commits), or None when forwarded to the leader.

        Raises ProposalDropped when no leader can take it now, NotLeader when this follower is
        configured not to forward."""
        if self.raft.role is Role.LEADER:
            return self.raft.propose_entries([data])
        self.raft.step(
            Message(MessageType.PROP, frm=self.raft.id, entries=(Entry(0, 0, data=data),))
        )
        return None

    def propose_batch(self, datas: list[bytes]) -> int | None:
        """Propose many entries at once: one log append and one AppendEntries per follower."""
        if not datas:
            raise InvalidArgument("empty proposal batch")
        if self.raft.role is Role.LEADER:
            return self.raft.propose_entries(datas)
        self.raft.step(
            Message(
                MessageType.PROP,
                frm=self.raft.id,
                entries=tuple(Entry(0, 0, data=d) for d in datas),
            )
        )
        return None

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Propose a single-server membership change; leader only.

        Raises NotLeader on a follower, ConfChangeRejected when a change is pending or the
        change is invalid for the current configuration."""
        r = self.raft
        if r.role is not Role.LEADER:
            raise NotLeader(r.lead)
        r._check_conf_change(cc)
        index = r.propose_entries([cc.encode()], [EntryType.CONF_CHANGE])
        r.pending_conf_index = index
        return index

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed CONF_CHANGE entry; the host persists the returned ConfState
        together with the applied index."""
        return self.raft.apply_conf_change(cc)

    def read_index(self, ctx: bytes) -> None:
        """Request a linearizable read; a ReadState with this ``ctx`` appears in a later Ready.

        ``ctx`` must be unique among pending reads (e.g. a request id)."""
        if not ctx:
            raise InvalidArgument("read_index needs a non-empty request context")
        self.raft.step(Message(MessageType.READ_INDEX, frm=self.raft.id, context=ctx))

    def transfer_leader(self, transferee: int) -> None:
        """Ask the leader to hand leadership to ``transferee`` (thesis §3.10)."""
        self.raft.step(Message(MessageType.TRANSFER_LEADER, frm=transferee))

    def report_unreachable(self, node_id: int) -> None:
        self.raft.step(Message(MessageType.UNREACHABLE, frm=node_id))

    def report_snapshot_failure(self, node_id: int) -> None:
        self.raft.step(Message(MessageType.SNAP_STATUS, frm=node_id, reject=True))

    # -- Ready / advance ------------------------------------------------------------------------

    def has_ready(self) -> bool:
        r = self.raft
        log = r.log
        return bool(
            r.msgs
            or r.read_states
            or log.unstable.entries
            or log.unstable.snapshot is not None
            or log.has_next_committed_entries()
            or r.soft_state() != self._prev_soft
            or self._hard_changed()
        )

    def _hard_changed(self) -> bool:
        r = self.raft
        p = self._prev_hard
        return r.term != p.term or r.vote != p.vote or r.log.committed != p.commit

    def _vote_or_term_changed(self, hard: HardState | None) -> bool:
        # A commit index alone may be lost in a crash (it is re-learned from the leader);
        # a term or vote must never be (election safety), so only those force an fsync.
        p = self._prev_hard
        return hard is not None and (hard.term != p.term or hard.vote != p.vote)

    def ready(self) -> Ready:
        """Collect what changed since the last Ready. Call ``advance()`` before the next one."""
        if self._in_flight is not None:
            raise InvariantViolation("ready() called twice without advance()")
        r = self.raft
        log = r.log
        soft = r.soft_state()
        hard = r.hard_state() if self._hard_changed() else None
        entries = tuple(log.unstable.entries)
        snap = log.unstable.snapshot
        self._seq += 1
        rd = Ready(
            seq=self._seq,
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard,
            entries=entries,
            snapshot=snap,
            committed_entries=tuple(log.next_committed_entries()),
            messages=_coalesce_acks(r.msgs),
            read_states=tuple(r.read_states),
            must_sync=bool(entries) or snap is not None or self._vote_or_term_changed(hard),
        )
        r.msgs = []
        r.read_states = []
        if rd.soft_state is not None:
            self._prev_soft = rd.soft_state
        self._in_flight = rd
        return rd

    def advance(self) -> None:
        """The host has persisted, sent and applied the last Ready."""
        rd = self._in_flight
        if rd is None:
            raise InvariantViolation("advance() without a Ready")
        self._in_flight = None
        r = self.raft
        log = r.log
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.entries:
            last = rd.entries[-1]
            log.stable_to(last.index, last.term)
            r.on_persisted(last.index, last.term)
        if rd.snapshot is not None:
            log.stable_snap_to(rd.snapshot.metadata.index)
            log.applied = max(log.applied, rd.snapshot.metadata.index)
        if rd.committed_entries:
            log.applied_to(rd.committed_entries[-1].index)
            # Committed entries no longer count against the uncommitted-tail bound (which only
            # a leader accumulates).
            if r.uncommitted_bytes:
                size = sum(len(e.data) for e in rd.committed_entries)
                size += ENTRY_OVERHEAD_BYTES * len(rd.committed_entries)
                r.uncommitted_bytes = max(0, r.uncommitted_bytes - size)

    # -- inspection -----------------------------------------------------------------------------

    @property
    def id(self) -> int:
        return self.raft.id

    def soft_state(self) -> SoftState:
        return self.raft.soft_state()

    def hard_state(self) -> HardState:
        return self.raft.hard_state()

    def status(self) -> Status:
        r = self.raft
        progress = (
            {nid: _peer_status(pr) for nid, pr in sorted(r.trk.progress.items())}
            if r.role is Role.LEADER
            else {}
        )
        return Status(
            id=r.id,
            term=r.term,
            vote=r.vote,
            commit=r.log.committed,
            applied=r.log.applied,
            last_index=r.log.last_index(),
            first_index=r.log.first_index(),
            leader_id=r.lead,
            role=r.role,
            lead_transferee=r.lead_transferee,
            conf_state=r.trk.conf_state(),
            progress=progress,
        )


def _coalesce_acks(msgs: list[Message]) -> tuple[Message, ...]:
    """Drop an accepting append acknowledgement when a later one in the same Ready tells the
    same leader, in the same term, about an index at least as high: the leader keeps only the
    highest match (``Progress.maybe_update``, ``Inflights.free_le``), so the earlier one is
    a message sent for nothing. A follower that took several appends in one iteration thus
    answers once (one acknowledgement per loop iteration, as etcd batches them)."""
    last: dict[tuple[int, int], int] = {}  # (to, term) -> position of the latest accept
    drop: set[int] = set()
    for i, m in enumerate(msgs):
        if m.type is MessageType.APP_RESP and not m.reject:
            key = (m.to, m.term)
            j = last.get(key)
            if j is not None and msgs[j].index <= m.index:
                drop.add(j)
            last[key] = i
    if not drop:
        return tuple(msgs)
    return tuple(m for i, m in enumerate(msgs) if i not in drop)
