"""The one exception tree of dkv.

Every layer raises from this tree; lower-level exceptions (grpc, rocksdict, OS errors) are
translated at one boundary per adapter with ``raise ... from exc``::

    DkvError                         expected conditions a caller can act on
    ├── NotLeader(leader_hint)       not the leader; try ``leader_hint`` (0 = unknown)
    ├── ProposalDropped(reason)      the proposal was not appended (no leader, transfer in flight,
    │   │                            uncommitted-size limit, pending conf change); safe to retry
    │   └── Overloaded               the leader's uncommitted log tail is full (backpressure)
    ├── ReadIndexDropped(reason)     a ReadIndex request could not be served now; safe to retry
    ├── ConfChangeRejected(reason)   the membership change is not allowed in the current state
    ├── DeadlineExceeded(reason)     no answer within the deadline: a write may or may not have
    │                                happened (no quorum, leader lost); retry with the same id
    ├── StorageError                 raised by a Raft Storage (read-only protocol of the core)
    │   ├── Compacted                the requested index is below the first retained index
    │   ├── Unavailable              the requested index is above the last index
    │   └── SnapshotTemporarilyUnavailable  the snapshot is being produced; retry later
    ├── InvalidArgument(reason)      the request is malformed (bad size, bad id, bad config)
    ├── PermissionDenied(reason)     the caller may not do this (dkv.security: the policy, a
    │                                component-only port, a node acting as another)
    ├── Unimplemented(reason)        the endpoint does not serve that method (e.g. a node's Admin
    │                                API asked at the front door); the reason says where it is
    └── DataDirError(reason)         the data directory cannot be used (belongs to another node
                                     or cluster, missing, unreadable); the process refuses to start

    InvariantViolation (AssertionError)
                                     a safety property of Raft was breached. This is a bug, not an
                                     expected condition, so it deliberately does NOT derive from
                                     DkvError: ``except DkvError`` must never swallow it.
"""

from __future__ import annotations

__all__ = [
    "Compacted",
    "ConfChangeRejected",
    "DataDirError",
    "DeadlineExceeded",
    "DkvError",
    "InvalidArgument",
    "InvariantViolation",
    "NotLeader",
    "PermissionDenied",
    "Overloaded",
    "ProposalDropped",
    "ReadIndexDropped",
    "SnapshotTemporarilyUnavailable",
    "StorageError",
    "Unavailable",
    "Unimplemented",
]


class DkvError(Exception):
    """Base of every expected error dkv raises."""


class NotLeader(DkvError):
    """This replica is not the leader. ``leader_hint`` is the leader's id, or 0 when unknown."""

    def __init__(self, leader_hint: int, message: str = "") -> None:
        self.leader_hint = leader_hint
        super().__init__(message or f"not the leader (leader hint: {leader_hint or 'unknown'})")


class ProposalDropped(DkvError):
    """The proposal was not appended to the log. Nothing happened; it is safe to retry."""


class Overloaded(ProposalDropped):
    """The leader's uncommitted log tail is at its bound: the shard is overloaded, not broken.
    Nothing was appended; retry after a pause (counted as ``overloaded`` in metrics)."""


class ReadIndexDropped(DkvError):
    """A ReadIndex request could not be served now. Nothing happened; it is safe to retry."""


class ConfChangeRejected(DkvError):
    """A membership change is not allowed in the current state (e.g. one is already pending)."""


class DeadlineExceeded(DkvError):
    """No answer within the deadline. For a write the outcome is unknown: it may have happened.
    Retrying with the same request id is safe (the state machine deduplicates)."""


class StorageError(DkvError):
    """Base for the errors a Raft ``Storage`` may raise."""


class Compacted(StorageError):
    """The requested index has been compacted away (it is at or below the snapshot index)."""


class Unavailable(StorageError):
    """The requested index is beyond the last index the storage holds."""


class SnapshotTemporarilyUnavailable(StorageError):
    """The storage is producing a snapshot; the caller should retry later."""


class InvalidArgument(DkvError):
    """A request or configuration is malformed; the message names the problem."""


class PermissionDenied(DkvError):
    """The caller's identity may not do this; the message names the subject and the action."""


class Unimplemented(DkvError):
    """The endpoint does not serve the method; the message says where it is served."""


class DataDirError(DkvError):
    """The data directory cannot be used; the message is the one-line reason shown at start-up."""


class InvariantViolation(AssertionError):
    """A Raft safety invariant was breached: a bug. Never caught by ``except DkvError``."""
