"""Configuration of one Raft group member. Every limit has a unit in its name."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dkv.errors import InvalidArgument

__all__ = ["Config", "ReadOnlyOption"]


class ReadOnlyOption(enum.Enum):
    """How the leader confirms it is still leader before serving a ReadIndex (thesis §6.4).

    SAFE: one heartbeat round acknowledged by a quorum, per batch of reads (§6.4).
    LEASE_BASED: answer at once while the leader lease holds: less than an election timeout
    (minus a tick) since a heartbeat round that a quorum acknowledged was sent (§6.4.1); fall
    back to a heartbeat round when it lapsed. Only safe when clock drift is bounded; requires
    ``check_quorum`` (whose leader stickiness is what the lease relies on).
    """

    SAFE = "safe"
    LEASE_BASED = "lease-based"


@dataclass(frozen=True, slots=True)
class Config:
    """Parameters of one member. Time is counted in ticks of the host's clock.

    Defaults follow etcd's: with a 100 ms tick, a 1 s election timeout and 100 ms heartbeats.
    """

    id: int
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 1
    # Index already applied by the host's state machine at start-up; committed entries at or
    # below it are not handed out again.
    applied_index: int = 0
    # Flow control (thesis §10.2): bound bytes per AppendEntries and messages in flight.
    max_msg_bytes: int = 1 << 20
    max_inflight_msgs: int = 256
    # Bound of the uncommitted tail a leader accepts before dropping proposals, so a leader that
    # cannot commit does not grow its log without limit. 0 disables the bound.
    max_uncommitted_entries_bytes: int = 64 << 20
    # Bound on committed entries handed out in one Ready.
    max_committed_bytes_per_ready: int = 64 << 20
    # PreVote (thesis §9.6): a partitioned node cannot disrupt the cluster when it returns.
    pre_vote: bool = True
    # CheckQuorum (thesis §6.2): a leader that has not heard from a quorum within an election
    # timeout steps down; followers ignore votes while they have a live leader (§4.2.3).
    check_quorum: bool = True
    read_only_option: ReadOnlyOption = ReadOnlyOption.SAFE
    # When True, followers reject proposals with NotLeader instead of forwarding to the leader.
    disable_proposal_forwarding: bool = False
    # Bound on ReadIndex requests queued at a leader (waiting for its first commit, or for the
    # heartbeat quorum). Past it new requests are dropped with ReadIndexDropped.
    max_pending_read_index: int = 4096
    # InstallSnapshot chunk size (thesis figure 5.3) and the largest snapshot a follower buffers.
    snapshot_chunk_bytes: int = 256 << 10
    max_snapshot_bytes: int = 1 << 30
    # A leader removed from the configuration steps down once it applies its own removal.
    step_down_on_removal: bool = True

    def validate(self) -> None:
        if self.id <= 0:
            raise InvalidArgument(f"node id must be positive, got {self.id}")
        if self.heartbeat_interval_ticks <= 0:
            raise InvalidArgument("heartbeat_interval_ticks must be positive")
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks:
            raise InvalidArgument(
                "election_timeout_ticks must be greater than heartbeat_interval_ticks "
                f"({self.election_timeout_ticks} <= {self.heartbeat_interval_ticks})"
            )
        if self.max_inflight_msgs <= 0:
            raise InvalidArgument("max_inflight_msgs must be positive")
        if self.max_msg_bytes <= 0 or self.snapshot_chunk_bytes <= 0:
            raise InvalidArgument("max_msg_bytes and snapshot_chunk_bytes must be positive")
        if self.max_pending_read_index <= 0:
            raise InvalidArgument("max_pending_read_index must be positive")
        if self.read_only_option is ReadOnlyOption.LEASE_BASED and not self.check_quorum:
            raise InvalidArgument("lease-based reads require check_quorum")
