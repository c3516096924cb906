"""Value types of the Raft core: entries, messages, states, snapshots, membership changes.

Every type here is an immutable dataclass so that one object can be shared between the log,
the outgoing messages and (in the simulator) several nodes without defensive copies. The wire
schema for these types is ``protos/dkv/v1/raft.proto``; :mod:`dkv.raft.codec` converts.

Node ids are positive integers; 0 means "none" (no vote, no known leader).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from dkv.errors import InvalidArgument

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "NONE",
    "SEND_BEFORE_PERSIST",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "EntryType",
    "HardState",
    "Message",
    "MessageType",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotChunk",
    "SnapshotMetadata",
    "SoftState",
    "is_local_message",
    "is_response_message",
]

NONE = 0
"""The id that means "no node": no vote cast, no leader known."""


ENTRY_OVERHEAD_BYTES = 16
"""Counted per entry for flow control and the uncommitted-size bound, so that empty entries
are not "free" when messages and proposals are bounded by size."""


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. ``data`` is opaque to Raft except for CONF_CHANGE entries.

    An empty NORMAL entry is what a new leader appends to commit an entry of its own term
    (thesis §3.6.2 and §6.4); hosts must skip it when applying.
    """

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def size_bytes(self) -> int:
        return len(self.data) + ENTRY_OVERHEAD_BYTES


class MessageType(enum.IntEnum):
    """Message kinds. LOCAL ones never cross the network: they are how the host drives the core
    (timers and local actions are messages too, as in etcd-io/raft)."""

    HUP = 0  # local: start an election (pre-vote first, if enabled)
    BEAT = 1  # local: leader, send heartbeats now
    PROP = 2  # propose entries (local on the leader, forwarded by followers)
    APP = 3  # AppendEntries (thesis §3.5)
    APP_RESP = 4
    VOTE = 5  # RequestVote (thesis §3.4)
    VOTE_RESP = 6
    SNAP = 7  # InstallSnapshot, one chunk per message (thesis §5.1, figure 5.3)
    HEARTBEAT = 8  # empty AppendEntries carrying only the commit index
    HEARTBEAT_RESP = 9
    UNREACHABLE = 10  # local: the transport could not reach ``frm``
    SNAP_STATUS = 11  # local: the transport reports a snapshot to ``frm`` failed (reject=True)
    CHECK_QUORUM = 12  # local: leader, verify a quorum was active (thesis §6.2)
    TRANSFER_LEADER = 13  # leadership transfer request (thesis §3.10)
    TIMEOUT_NOW = 14  # leader to transferee: campaign now, skipping PreVote
    READ_INDEX = 15  # ReadIndex request (thesis §6.4)
    READ_INDEX_RESP = 16
    PRE_VOTE = 17  # PreVote request (thesis §9.6)
    PRE_VOTE_RESP = 18
    SNAP_RESP = 19  # acknowledgement of one InstallSnapshot chunk


SEND_BEFORE_PERSIST = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})
"""A leader's messages: they assert nothing about the sender's durable state (Ready, step 2)."""

_LOCAL = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
        MessageType.CHECK_QUORUM,
    }
)
_RESPONSES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.READ_INDEX_RESP,
        MessageType.PRE_VOTE_RESP,
        MessageType.SNAP_RESP,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
    }
)


def is_local_message(t: MessageType) -> bool:
    """True for messages the host feeds to its own node and that never cross the network."""
    return t in _LOCAL


def is_response_message(t: MessageType) -> bool:
    return t in _RESPONSES


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership of a group: sorted voter ids and sorted learner ids (disjoint)."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if set(self.voters) & set(self.learners):
            raise InvalidArgument(
                f"a node cannot be both voter and learner: {set(self.voters) & set(self.learners)}"
            )
        if list(self.voters) != sorted(set(self.voters)) or list(self.learners) != sorted(
            set(self.learners)
        ):
            raise InvalidArgument("ConfState ids must be sorted and unique")

    @staticmethod
    def of(
        voters: set[int] | list[int] | tuple[int, ...] | frozenset[int] = (),
        learners: set[int] | list[int] | tuple[int, ...] | frozenset[int] = (),
    ) -> ConfState:
        return ConfState(tuple(sorted(set(voters))), tuple(sorted(set(learners))))


@dataclass(frozen=True, slots=True)
class SnapshotMetadata:
    index: int = 0
    term: int = 0
    conf_state: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A point-in-time image of the state machine, covering the log up to ``metadata.index``."""

    metadata: SnapshotMetadata = field(default_factory=SnapshotMetadata)
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.metadata.index == 0


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """One InstallSnapshot RPC's payload (thesis figure 5.3: offset, data, done).

    The follower accumulates chunks in order; ``done`` marks the last. ``total_bytes`` lets the
    follower bound its buffer up front and reject a snapshot it cannot hold.
    """

    metadata: SnapshotMetadata
    offset: int
    data: bytes
    done: bool
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Message:
    """A Raft message. ``frm`` is the sender (``from`` is a Python keyword).

    Field use by type follows etcd-io/raft: ``index``/``log_term`` name the entry preceding
    ``entries`` in APP, the candidate's last entry in (PRE_)VOTE, and the acknowledged index in
    APP_RESP; ``reject_hint`` and ``log_term`` in a rejecting APP_RESP let the leader skip a
    whole term of conflicting entries at once (thesis §3.5's optimisation). In SNAP_RESP,
    ``index`` names the snapshot and ``reject_hint`` is the next byte offset the follower
    expects (``reject`` = it refuses the snapshot). In HEARTBEAT, ``index`` is the leader's
    tick count, echoed in HEARTBEAT_RESP to time the leader lease. ``context`` carries
    the ReadIndex request id, and ``b"transfer"`` on a VOTE caused by leadership transfer.
    """

    type: MessageType
    to: int = NONE
    frm: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: SnapshotChunk | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on stable storage before any message of the same Ready is sent."""

    term: int = 0
    vote: int = NONE
    commit: int = 0

    def is_empty(self) -> bool:
        return self.term == 0 and self.vote == NONE and self.commit == 0


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state that need not be persisted; reported when it changes."""

    leader_id: int
    role: Role


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied ``index``.

    ``request_ctx`` is the id the caller passed to ``read_index``.
    """

    index: int
    request_ctx: bytes


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0  # add a voter, or promote an existing learner to voter
    ADD_LEARNER = 1  # add a non-voting member (replicates, never votes, never counts)
    REMOVE_NODE = 2


_CC_HEADER = struct.Struct(">BQ")


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A single-server membership change (thesis §4.1); carried in a CONF_CHANGE entry."""

    type: ConfChangeType
    node_id: int
    context: bytes = b""

    def encode(self) -> bytes:
        return _CC_HEADER.pack(int(self.type), self.node_id) + self.context

    @staticmethod
    def decode(data: bytes) -> ConfChange:
        if len(data) < _CC_HEADER.size:
            raise InvalidArgument(f"conf change entry too short ({len(data)} bytes)")
        t, node_id = _CC_HEADER.unpack_from(data)
        try:
            cc_type = ConfChangeType(t)
        except ValueError as exc:
            raise InvalidArgument(f"unknown conf change type {t}") from exc
        return ConfChange(cc_type, node_id, data[_CC_HEADER.size :])


@dataclass(frozen=True, slots=True)
class Ready:
    """Everything the host must do after the core changed state. Obey the order:

    1. Persist ``snapshot`` (if any), then ``entries`` (appending; an entry at an index already
       stored replaces it and everything after it), then ``hard_state`` (if not None) — all to
       stable storage, fsynced when ``must_sync`` is set.
    2. Only then send ``messages``. (A vote or an acknowledgement sent before the state that
       justifies it is durable can break election safety after a crash.) The exception is
       ``early_messages()``: a leader's appends, heartbeats and snapshot chunks claim nothing
       about its own disk, so a host may send them before step 1, writing its log in parallel
       with the followers (thesis §10.2.1); the leader counts its own copy toward a commit
       only once ``advance()`` says it is written. ``late_messages()`` are the rest.
    3. Apply ``snapshot`` to the state machine if any, then apply ``committed_entries`` in order.
       CONF_CHANGE entries are applied with ``RawNode.apply_conf_change``. Empty NORMAL entries
       are leader no-ops: skip them.
    4. Serve the ``read_states`` whose index the state machine has applied.
    5. Call ``RawNode.advance()``; only then ask for the next Ready.

    ``seq`` numbers Readys from 1 so persistence can be batched and reported by number.
    """

    seq: int
    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False

    def early_messages(self) -> list[Message]:
        """The messages that may be sent before this Ready is persisted (see step 2)."""
        return [m for m in self.messages if m.type in SEND_BEFORE_PERSIST]

    def late_messages(self) -> list[Message]:
        """The messages that must wait until this Ready is persisted."""
        return [m for m in self.messages if m.type not in SEND_BEFORE_PERSIST]
