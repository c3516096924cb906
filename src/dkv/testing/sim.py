"""The deterministic simulator: a whole Raft group, its network and its clients in one process.

In the spirit of TigerBeetle's VOPR: ONE ``random.Random(seed)`` owns every choice the run
makes -- the fault rates of this seed ("swarm testing": each seed draws its own drop and
duplication probabilities, delays, partition, crash, snapshot and membership-change rates,
cluster size, Raft options), the message delays and losses, which node crashes when, what the
clients ask, and the RNG handed to each Raft node for its election timeouts. Time is virtual
(``SUBTICKS_PER_TICK`` sub-ticks per Raft tick, all nodes tick together); nothing reads a clock.
So a seed is a complete description of a run, and ``make sim SEED=n`` replays it exactly.

A run has two phases:

1. **Safety**: faults at this seed's rates. The network drops, delays, duplicates and
   reorders messages and is partitioned (isolated node, split, one-way links); in some seeds
   the transport tells a sender about its lost messages (``report_unreachable``), in others
   losses are silent. Nodes crash,
   losing whatever they had not persisted (``MemoryHost.crash``: a node takes its Ready,
   sends the messages a Ready allows before persisting -- a leader's appends, thesis
   §10.2.1 -- and finishes the write after a random "disk" delay, so a crash often falls
   between a step and its persist, or after a leader's appends went out but before its own
   copy was written), and restart from their storage. The leader is asked to transfer leadership;
   membership changes add learners with new ids, promote them, remove voters (never below 3).
   Hosts snapshot and compact so lagging nodes need InstallSnapshot.
2. **Liveness**: the network heals, every node restarts, faults and new client requests stop.
   A leader must commit a new entry, every member must apply it and the leader must be
   settled (nothing of its log unapplied, no transfer under way): the run fails when
   ``liveness_ticks`` pass without progress (the marker committing, or a member applying
   more), or ``LIVENESS_CAP`` times that in all -- a lagging member that catches up slowly
   (small windows, small messages) is progress, a stuck one is not. Then, for
   ``STABLE_ELECTION_TIMEOUTS`` election timeouts the leadership must not change. In some
   seeds (``liveness_down``) a minority of voters goes down for good once the group first
   converges, and it must converge again: a bare quorum must be enough.

After every event the invariant checkers of :mod:`dkv.testing.invariants` run on what the event
touched (hooks on the storages and state machines see every persist and apply). At the end the
clients' history is checked for linearizability against the KV model, one key at a time. A
failure report names the invariant, says where it broke, shows the node states and the last
trace lines, and ends with the one command that replays the seed.

Clients: each waits for one operation at a time and sends it to the node it believes leads
(sometimes to any node: followers forward). An operation's outcome is recorded only when it is
*known*: a write (or a logged read) when the node it was sent to applies it --
``sm.results[op_id]`` on that node; a ReadIndex read when that node has applied the read index
and serves the value, at that moment. A synchronous ProposalDropped / NotLeader /
ReadIndexDropped means the operation did not happen: it is left out of the history. After
``op_timeout_ticks`` the client stops waiting and moves on (to another node, so that it finds
the new leader fast, as real clients do); a result its node reports later is still recorded, at
that later time. An operation whose result never came is recorded with an unknown outcome
(return time infinity: it may have happened at any time after its call, or not at all) -- unless
no node ever applied it, in which case it provably had no effect on anything observed and is
left out (see ``Simulator._final_history``). A read whose outcome is unknown constrains nothing
and is dropped.

Everything is bounded: messages in flight (``MAX_IN_FLIGHT_MSGS``; past it the network drops,
like a full socket buffer), one awaited and at most ``MAX_ABANDONED_OPS`` abandoned operations
per client, the number of nodes ever created (``MAX_NODES``) and members (``MAX_MEMBERS``), the
trace kept for failure reports (``TRACE_TAIL_LINES``).

Command line::

    python -m dkv.testing.sim --seed 1234 --verbose      # replay one seed with its trace
    python -m dkv.testing.sim --seeds 0:10000 --jobs 2   # a sweep; prints failures and speed
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import os
import random
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from dkv.errors import (
    ConfChangeRejected,
    DkvError,
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
    EntryType,
    MemoryStorage,
    Message,
    MessageType,
    ReadOnlyOption,
    Role,
    Snapshot,
)
from dkv.testing.invariants import (
    CommittedEntry,
    DurableLog,
    InvariantFailure,
    RaftInvariants,
    check_applied_entries,
    check_history,
    check_log_matching,
    check_state_machines,
)
from dkv.testing.linearizability import Operation
from dkv.testing.memhost import MemoryHost, encode_command

__all__ = [
    "GIVE_UP_ELECTION_TIMEOUTS",
    "MAX_ABANDONED_OPS",
    "MAX_IN_FLIGHT_MSGS",
    "MAX_MEMBERS",
    "MAX_NODES",
    "MIN_VOTERS",
    "LIVENESS_CAP",
    "STABLE_ELECTION_TIMEOUTS",
    "SUBTICKS_PER_TICK",
    "CheckedStorage",
    "SimParams",
    "SimResult",
    "Simulator",
    "SweepFailure",
    "main",
    "replay_command",
    "run_seed",
    "sweep",
]

SUBTICKS_PER_TICK = 10
"""Virtual time resolution: message and disk delays are drawn in sub-ticks."""

MAX_IN_FLIGHT_MSGS = 20_000
"""Network bound: past it a new message is dropped (a full socket buffer)."""

MAX_NODES = 12
"""Bound on nodes ever created in one run (initial voters plus added learners)."""

MAX_MEMBERS = 7
"""Bound on voters + learners at any time."""

MIN_VOTERS = 3
"""Membership changes never leave fewer voters than this."""

MAX_ABANDONED_OPS = 3
"""Per client: operations it stopped waiting for whose late results are still recorded. A
client with this many does not start another (back-pressure)."""

GIVE_UP_ELECTION_TIMEOUTS = 20
"""An abandoned operation not answered within this many election timeouts of its call is
forgotten: its outcome stays unknown. Long, because every forgotten operation that did commit
stays open to the end of the history, and many of those make the linearizability search
exponential; short ones would also be wrong about slow-but-healthy clusters."""

LIVENESS_CAP = 4
"""The liveness phase fails after this many ``liveness_ticks`` even if progress continues."""

STABLE_ELECTION_TIMEOUTS = 3
"""After convergence the run goes on this many election timeouts with no leader change."""

TRACE_TAIL_LINES = 80
"""Trace lines kept for a failure report (all of them are hashed into the fingerprint)."""

CHECKER_TIMEOUT_S = 60.0
"""Linearizability search budget per seed; far above what a seed's history needs."""

LIVE_KEY = "__live__"


def replay_command(seed: int) -> str:
    """The one command that replays ``seed`` with its full trace."""
    return f"make sim SEED={seed}"


# -- parameters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimParams:
    """Everything that shapes one run, drawn from the seed by :meth:`draw`.

    Probabilities named ``*_prob`` are per message (network) or per tick (faults, clients).
    """

    voters: int
    pre_vote: bool
    check_quorum: bool
    read_only: ReadOnlyOption
    proposal_forwarding: bool
    election_timeout_ticks: int
    heartbeat_interval_ticks: int
    max_inflight_msgs: int
    max_msg_bytes: int
    snapshot_chunk_bytes: int
    drop_prob: float
    dup_prob: float
    report_unreachable: bool
    delay_min_subticks: int
    delay_max_subticks: int
    disk_delay_max_subticks: int
    partition_prob: float
    heal_prob: float
    crash_prob: float
    down_ticks_max: int
    snapshot_every_entries: int
    compact_keep_entries: int
    transfer_prob: float
    membership_prob: float
    clients: int
    keys: int
    op_prob: float
    read_index_prob: float
    op_timeout_ticks: int
    safety_ticks: int
    liveness_ticks: int
    liveness_down: int

    @classmethod
    def draw(cls, rng: random.Random) -> SimParams:
        """Swarm testing: each seed gets its own mix, so some seeds hammer one fault hard
        while others barely see it (Groce et al., "Swarm Testing", 2012)."""

        def maybe(p: float, value: float) -> float:
            return value if rng.random() < p else 0.0

        check_quorum = rng.random() < 0.7
        # Lease reads need CheckQuorum and assume every node's ticks have the same length,
        # which holds here (all nodes tick together); SAFE stays the common case.
        lease = check_quorum and rng.random() < 0.3
        delay_min = rng.randint(1, 3)
        election = rng.choice((5, 10, 10, 15))
        return cls(
            voters=rng.choice((3, 3, 5)),
            pre_vote=rng.random() < 0.8,
            check_quorum=check_quorum,
            read_only=ReadOnlyOption.LEASE_BASED if lease else ReadOnlyOption.SAFE,
            proposal_forwarding=rng.random() < 0.85,
            election_timeout_ticks=election,
            heartbeat_interval_ticks=rng.choice((1, 1, 2)),
            max_inflight_msgs=rng.choice((1, 2, 8, 256)),
            max_msg_bytes=rng.choice((64, 512, 1 << 20)),
            snapshot_chunk_bytes=rng.choice((256, 2048, 1 << 16)),
            drop_prob=maybe(0.7, rng.choice((0.01, 0.05, 0.15, 0.3))),
            dup_prob=maybe(0.5, rng.choice((0.01, 0.05, 0.2))),
            report_unreachable=rng.random() < 0.5,
            delay_min_subticks=delay_min,
            delay_max_subticks=delay_min + rng.choice((0, 5, 10, 20, 40)),
            disk_delay_max_subticks=rng.choice((0, 2, 5, 15)),
            partition_prob=maybe(0.7, rng.choice((0.01, 0.03, 0.08))),
            heal_prob=rng.choice((0.01, 0.03, 0.1)),
            crash_prob=maybe(0.75, rng.choice((0.005, 0.01, 0.03, 0.06))),
            down_ticks_max=rng.choice((5, 20, 60)),
            snapshot_every_entries=int(maybe(0.7, rng.choice((4, 10, 30)))),
            compact_keep_entries=rng.choice((0, 2, 10)),
            transfer_prob=maybe(0.5, rng.choice((0.005, 0.02, 0.05))),
            membership_prob=maybe(0.6, rng.choice((0.01, 0.03, 0.06))),
            clients=rng.randint(2, 5),
            keys=rng.randint(1, 4),
            op_prob=rng.choice((0.1, 0.3, 0.7)),
            read_index_prob=rng.choice((0.2, 0.5, 0.9)),
            op_timeout_ticks=max(2, int(rng.choice((0.5, 1, 2, 4)) * election)),
            safety_ticks=rng.randint(250, 900),
            liveness_ticks=50 * election,
            liveness_down=1 if rng.random() < 0.3 else 0,
        )

    def describe(self) -> str:
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float):
                v = f"{v:g}"
            elif isinstance(v, ReadOnlyOption):
                v = v.value
            parts.append(f"{f.name}={v}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class SimResult:
    """What one seed did. ``failure`` is the full report (None when the run passed);
    ``fingerprint`` hashes the whole trace and final state, for the determinism test."""

    seed: int
    params: SimParams
    failure: str | None
    invariant: str | None
    ticks: int
    fingerprint: str
    stats: dict[str, int]
    history_ops: int

    @property
    def ok(self) -> bool:
        return self.failure is None


class _SimFailure(Exception):
    """Ends a run: ``invariant`` names what broke, ``detail`` explains."""

    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"{invariant}: {detail}")


class _LivenessFailure(_SimFailure):
    """The healed cluster did not converge in time. The run's safety checks still run."""


# -- storage with hooks --------------------------------------------------------------------------


class CheckedStorage(MemoryStorage):
    """A MemoryStorage that reports every persisted batch, truncation and installed snapshot to
    the invariant checker, so log matching and durability are checked at the write itself.
    Also the node's :class:`DurableLog` (what survives its crashes)."""

    def __init__(
        self, node_id: int, inv: RaftInvariants, conf_state: ConfState | None = None
    ) -> None:
        super().__init__(conf_state)
        self.node_id = node_id
        self.inv = inv

    def snapshot_index(self) -> int:
        return self.snapshot().metadata.index

    def append(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        first = self.first_index()
        ents = [e for e in entries if e.index >= first] if entries[0].index < first else entries
        if not ents:
            super().append(entries)
            return
        start = ents[0].index
        last = self.last_index()
        if start - 1 > last:
            super().append(entries)  # a gap: MemoryStorage raises InvariantViolation
            return
        prev_term = self.term(start - 1)
        removed: list[tuple[int, int]] = []
        n = len(ents)
        for i in range(start, last + 1):
            old = self.term(i)
            j = i - start
            if j >= n or ents[j].term != old:
                removed.append((i, old))
        super().append(entries)
        self.inv.observe_append(self.node_id, prev_term, ents, removed)

    def apply_snapshot(self, snap: Snapshot) -> None:
        idx = snap.metadata.index
        if idx <= self.snapshot_index():
            super().apply_snapshot(snap)
            return
        lo = max(idx + 1, self.first_index())
        removed = [(i, self.term(i)) for i in range(lo, self.last_index() + 1)]
        super().apply_snapshot(snap)
        self.inv.observe_snapshot(self.node_id, idx, snap.metadata.term, removed)

    def full_log(self) -> tuple[int, list[Entry]]:
        first = self.first_index()
        return self.term(first - 1), self.entries(first, self.last_index() + 1)


# -- clients -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Op:
    op_id: str
    client: int
    input: tuple[Any, ...]
    call: int
    node: int
    deadline: int
    ctx: bytes  # ReadIndex request id; b"" for a logged command
    data: bytes  # the logged command; b"" for a ReadIndex read


@dataclass(slots=True)
class _Client:
    """A client: one operation it waits for (``op``), and operations it gave up waiting for
    but whose node may still report a result (``abandoned``, oldest first)."""

    id: int
    believed_leader: int = 0
    seq: int = 0
    op: _Op | None = None
    abandoned: deque[_Op] = field(default_factory=deque)
    seen: dict[str, str | None] = field(default_factory=dict)


# -- the simulator -------------------------------------------------------------------------------

_TICK, _DELIVER, _READY, _WRITTEN = 0, 1, 2, 3


class Simulator:
    """One run of one seed. ``run()`` returns a :class:`SimResult`; it never raises for a
    violation (the result carries the report), only for bugs in the simulator itself."""

    def __init__(
        self,
        seed: int,
        *,
        params: SimParams | None = None,
        verbose: bool = False,
        out: TextIO | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.params = params if params is not None else SimParams.draw(self.rng)
        self.custom_params = params is not None
        self.verbose = verbose
        self.out = out if out is not None else sys.stdout
        self.inv = RaftInvariants()

        self.now = 0  # sub-ticks
        self.tick_no = 0
        self._queue: list[tuple[int, int, int, Any]] = []
        self._seq = 0
        self._ready_scheduled: set[int] = set()
        self._in_flight = 0

        p = self.params
        self.drop_prob = p.drop_prob
        self.dup_prob = p.dup_prob
        self.delay_min = p.delay_min_subticks
        self.delay_max = p.delay_max_subticks
        self.blocked: set[tuple[int, int]] = set()

        self.hosts: dict[int, MemoryHost] = {}
        self.storages: dict[int, CheckedStorage] = {}
        self.retired: set[int] = set()
        self.restart_at: dict[int, int] = {}  # node -> tick
        self.conf = ConfState.of(list(range(1, p.voters + 1)))
        self.conf_index = 1  # the bootstrap snapshot's index
        self.next_node_id = p.voters + 1

        self.clients = [_Client(i) for i in range(1, p.clients + 1)]
        self.pending_writes: dict[bytes, _Op] = {}
        self.pending_reads: dict[bytes, _Op] = {}
        self.history: list[Operation] = []
        self._unknown: list[tuple[Operation, bytes]] = []
        self.history_len = 0  # of the final history, unknown outcomes included

        self.phase = "safety"
        self.live_marker_index = 0
        self.live_markers: set[bytes] = set()
        self.live_proposals = 0
        self.converged_tick = 0
        self._leaders_at_convergence = 0
        self._progress = (0, 0)
        self._progress_tick = 0
        self.kept_down: set[int] = set()
        self.degraded = False
        self.done = False

        self._role_seen: dict[int, tuple[Role, int]] = {}
        self.leaders: dict[int, int] = {}  # node -> term, for nodes currently leading
        self._new_commits: list[CommittedEntry] = []
        self._snap_installs_seen: dict[int, int] = {}
        self._traced_commit = 0
        self._to_retire: list[int] = []

        self._hash = hashlib.blake2b(digest_size=16)
        self.trace_tail: deque[str] = deque(maxlen=TRACE_TAIL_LINES)
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "msgs_sent",
                "msgs_delivered",
                "msgs_dropped",
                "msgs_duplicated",
                "crashes",
                "restarts",
                "partitions",
                "leaders_elected",
                "transfers",
                "conf_changes_proposed",
                "conf_changes_applied",
                "snapshots_installed",
                "ops_ok",
                "ops_late",
                "ops_unknown",
                "ops_unknown_never_applied",
                "ops_rejected",
                "reads_read_index",
            ),
            0,
        )

    # -- tracing ---------------------------------------------------------------------------

    def _trace(self, text: str) -> None:
        line = f"[{self.now / SUBTICKS_PER_TICK:8.1f}] {text}"
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        self.trace_tail.append(line)
        if self.verbose:
            print(line, file=self.out)

    # -- setup -----------------------------------------------------------------------------

    def _node_config(self, nid: int) -> Config:
        p = self.params
        return Config(
            id=nid,
            election_timeout_ticks=p.election_timeout_ticks,
            heartbeat_interval_ticks=p.heartbeat_interval_ticks,
            max_inflight_msgs=p.max_inflight_msgs,
            max_msg_bytes=p.max_msg_bytes,
            snapshot_chunk_bytes=p.snapshot_chunk_bytes,
            pre_vote=p.pre_vote,
            check_quorum=p.check_quorum,
            read_only_option=p.read_only,
            disable_proposal_forwarding=not p.proposal_forwarding,
        )

    def _create_host(self, nid: int, bootstrap: ConfState | None = None) -> MemoryHost:
        """A node with its own storage and Raft RNG (derived from the seed).

        Initial members are bootstrapped with the group's configuration (MemoryStorage puts it
        in a snapshot at index 1); a node that joins later starts empty and learns everything
        from its leader, as a real joining node does."""
        storage = CheckedStorage(nid, self.inv, bootstrap)
        p = self.params
        host = MemoryHost(
            self._node_config(nid),
            storage,
            random.Random(self.rng.getrandbits(64)),
            snapshot_every_entries=p.snapshot_every_entries,
            compact_keep_entries=p.compact_keep_entries,
        )
        host.on_apply = self._on_apply
        self.hosts[nid] = host
        self.storages[nid] = storage
        self._snap_installs_seen[nid] = 0
        self._poke(nid)
        return host

    # -- the event queue -------------------------------------------------------------------

    def _push(self, at: int, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def _poke(self, nid: int) -> None:
        """The node has input to handle: take its Ready after a random latency. Until it is
        written (``_run_written``) what it did is volatile, so a crash in between loses it."""
        if nid in self._ready_scheduled:
            return
        self._ready_scheduled.add(nid)
        d = self.params.disk_delay_max_subticks
        self._push(self.now + (self.rng.randint(0, d) if d else 0), _READY, nid)

    # -- network ---------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self.stats["msgs_sent"] += 1
        if m.to in self.retired or m.to not in self.hosts:
            self._lost(m)
            return
        if self._in_flight >= MAX_IN_FLIGHT_MSGS or self.rng.random() < self.drop_prob:
            self._lost(m)
            return
        self._in_flight += 1
        self._push(self.now + self.rng.randint(self.delay_min, self.delay_max), _DELIVER, m)
        # A forwarded proposal is not idempotent (it has no index yet): duplicating it would
        # be a client retry, which the KV state machine cannot deduplicate. Every other message
        # is idempotent by design and must survive duplication.
        if m.type is not MessageType.PROP and self.rng.random() < self.dup_prob:
            self.stats["msgs_duplicated"] += 1
            self._in_flight += 1
            self._push(self.now + self.rng.randint(self.delay_min, self.delay_max), _DELIVER, m)

    def _lost(self, m: Message) -> None:
        """A message did not arrive. With ``report_unreachable`` the sender's transport
        notices (a broken stream, a refused connection) and tells its node, as a real host
        does; without, the loss is silent, as on a lossy datagram network. Raft must stay live
        either way."""
        self.stats["msgs_dropped"] += 1
        if not self.params.report_unreachable:
            return
        sender = self.hosts.get(m.frm)
        if sender is None or sender.node is None:
            return
        if m.type is MessageType.SNAP:
            sender.node.report_snapshot_failure(m.to)
        else:
            sender.node.report_unreachable(m.to)
        self._poke(m.frm)

    def _deliver(self, m: Message) -> int | None:
        self._in_flight -= 1
        host = self.hosts.get(m.to)
        if host is None or host.node is None or (m.frm, m.to) in self.blocked:
            self._lost(m)
            return None
        self.stats["msgs_delivered"] += 1
        try:
            host.node.step(m)
        except DkvError as exc:
            raise _SimFailure(
                "core raised on a network message",
                f"node {m.to} raised {type(exc).__name__}({exc}) on {m}",
            ) from exc
        self._poke(m.to)
        return m.to

    # -- the host loop ---------------------------------------------------------------------

    def _run_ready(self, nid: int) -> None:
        """Take the node's Ready and send what may go before it is written; the write
        finishes (``_WRITTEN``) after a random disk delay. ``_ready_scheduled`` holds the node
        until then: one Ready at a time, as a real host does."""
        host = self.hosts[nid]
        if host.node is None or not host.node.has_ready():
            self._ready_scheduled.discard(nid)
            return
        for m in host.begin_ready():
            self._send(m)
        d = self.params.disk_delay_max_subticks
        self._push(self.now + (self.rng.randint(0, d) if d else 0), _WRITTEN, nid)

    def _run_written(self, nid: int) -> None:
        self._ready_scheduled.discard(nid)
        host = self.hosts[nid]
        if host.node is None:
            return
        if not host.ready_in_flight:
            # The node crashed during the write (and may have restarted): the Ready is lost.
            if host.node.has_ready():
                self._poke(nid)
            return
        for m in host.finish_ready():
            self._send(m)
        if host.snapshots_installed != self._snap_installs_seen[nid]:
            self._snap_installs_seen[nid] = host.snapshots_installed
            self.stats["snapshots_installed"] += 1
            self._trace(f"n{nid} installed snapshot at {host.applied_index}")
            self._complete_from_results(nid)
        if host.read_states:
            for rs in host.take_read_states():
                op = self.pending_reads.get(rs.request_ctx)
                if op is not None and op.node == nid:
                    del self.pending_reads[rs.request_ctx]
                    self._complete(op, host.sm.get(op.input[1]))
        if host.node is not None and host.node.has_ready():
            self._poke(nid)

    def _on_apply(self, host: MemoryHost, e: Entry) -> None:
        rec = self.inv.observe_apply(host.id, e, host.raw().raft.term)
        if rec is not None:
            self._new_commits.append(rec)
            if e.type is EntryType.CONF_CHANGE and e.index > self.conf_index:
                self._on_conf_committed(host, e)
        if e.data:
            op = self.pending_writes.get(e.data)
            if op is not None and op.node == host.id:
                del self.pending_writes[e.data]
                self._complete(op, host.sm.results[op.op_id])
            elif e.data in self.live_markers and self.live_marker_index == 0:
                self.live_marker_index = e.index
                self._trace(f"liveness marker committed at {e.index}")

    def _on_conf_committed(self, host: MemoryHost, e: Entry) -> None:
        old = self.conf
        self.conf = host.conf_state
        self.conf_index = e.index
        self.stats["conf_changes_applied"] += 1
        cc = ConfChange.decode(e.data)
        self._trace(
            f"conf change {cc.type.name} n{cc.node_id} committed at {e.index}: "
            f"voters {list(self.conf.voters)} learners {list(self.conf.learners)}"
        )
        gone = (
            (set(old.voters) | set(old.learners)) - set(self.conf.voters) - set(self.conf.learners)
        )
        # The operator shuts a removed member down (etcd does the same): left running, a
        # removed node that never learns of its removal would campaign forever. Not here and
        # now, though: we are inside some node's Ready, which must finish first.
        self._to_retire.extend(sorted(gone))

    def _retire(self) -> None:
        for nid in self._to_retire:
            self.retired.add(nid)
            self.restart_at.pop(nid, None)
            h = self.hosts.get(nid)
            if h is not None and h.node is not None:
                h.crash()
            self.leaders.pop(nid, None)
            self._role_seen.pop(nid, None)
            self._trace(f"n{nid} removed and shut down")
        self._to_retire.clear()

    # -- per-step checks -------------------------------------------------------------------

    def _check_nodes(self, nids: Iterable[int]) -> None:
        """Election safety and leader completeness for the nodes the last event touched."""
        inv = self.inv
        for nid in nids:
            host = self.hosts[nid]
            node = host.node
            if node is None:
                self.leaders.pop(nid, None)
                self._role_seen.pop(nid, None)
                continue
            r = node.raft
            role, term = r.role, r.term
            seen = self._role_seen.get(nid)
            if seen is not None and seen[0] is role and seen[1] == term:
                continue
            self._role_seen[nid] = (role, term)
            is_leader = role is Role.LEADER
            inv.observe_role(nid, term, is_leader)
            if is_leader:
                self.leaders[nid] = term
                self.stats["leaders_elected"] += 1
                self._trace(f"n{nid} leader in term {term} (last index {r.log.last_index()})")
                inv.check_leader_log(nid, term, r.log)
            elif seen is not None and seen[0] is Role.LEADER:
                self.leaders.pop(nid, None)
                self._trace(f"n{nid} stepped down in term {term} ({role.value})")
        if self._new_commits:
            commits, self._new_commits = self._new_commits, []
            for lid, term in self.leaders.items():
                node = self.hosts[lid].node
                if node is not None:
                    inv.check_leader_log(lid, term, node.raft.log, commits)

    def _durable_quorum(self) -> None:
        durable: dict[int, DurableLog] = dict(self.storages)
        self.inv.check_durable_quorum(self.conf.voters, durable)

    # -- leader and membership -------------------------------------------------------------

    def current_leader(self) -> int:
        best, best_term = 0, -1
        for nid, term in sorted(self.leaders.items()):
            if term > best_term and self.hosts[nid].node is not None:
                best, best_term = nid, term
        return best

    def members(self) -> list[int]:
        return sorted((*self.conf.voters, *self.conf.learners))

    def _maybe_change_membership(self) -> None:
        lid = self.current_leader()
        if not lid:
            return
        node = self.hosts[lid].raw()
        voters, learners = list(self.conf.voters), list(self.conf.learners)
        rng = self.rng
        if learners and rng.random() < 0.6:
            cc = ConfChange(ConfChangeType.ADD_NODE, rng.choice(learners))
        elif len(voters) > MIN_VOTERS and (
            len(voters) + len(learners) >= MAX_MEMBERS or rng.random() < 0.5
        ):
            cc = ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(voters))
        elif learners and rng.random() < 0.3:
            cc = ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(learners))
        elif len(voters) + len(learners) < MAX_MEMBERS and self.next_node_id <= MAX_NODES:
            cc = ConfChange(ConfChangeType.ADD_LEARNER, self.next_node_id)
        else:
            return
        try:
            index = node.propose_conf_change(cc)
        except (ConfChangeRejected, NotLeader, ProposalDropped) as exc:
            self._trace(f"conf change {cc.type.name} n{cc.node_id} refused by n{lid}: {exc}")
            return
        self.stats["conf_changes_proposed"] += 1
        self._trace(f"n{lid} proposes {cc.type.name} n{cc.node_id} at {index}")
        self._poke(lid)
        if cc.type is ConfChangeType.ADD_LEARNER:
            self.next_node_id += 1
            self._create_host(cc.node_id)

    # -- faults ----------------------------------------------------------------------------

    def _crash(self, nid: int, restart: bool = True) -> None:
        self.hosts[nid].crash()
        self.stats["crashes"] += 1
        self.leaders.pop(nid, None)
        self._role_seen.pop(nid, None)
        if restart:
            self.restart_at[nid] = self.tick_no + self.rng.randint(1, self.params.down_ticks_max)
            self._trace(f"n{nid} crashed (restart at tick {self.restart_at[nid]})")
        else:
            self._trace(f"n{nid} crashed (for good)")
        self._durable_quorum()

    def _restart(self, nid: int) -> None:
        host = self.hosts[nid]
        host.restart()
        self.stats["restarts"] += 1
        self._snap_installs_seen[nid] = host.snapshots_installed
        st = self.storages[nid]
        self._trace(
            f"n{nid} restarted: term {st.hard_state.term} commit {st.hard_state.commit} "
            f"log [{st.first_index()}, {st.last_index()}] applied {host.applied_index}"
        )
        self._complete_from_results(nid)
        self._poke(nid)

    def _partition(self) -> None:
        rng = self.rng
        nodes = [n for n in sorted(self.hosts) if n not in self.retired]
        if len(nodes) < 2:
            return
        kind = rng.choice(("isolate", "split", "oneway"))
        lid = self.current_leader()
        x = lid if lid and rng.random() < 0.5 else rng.choice(nodes)
        others = [n for n in nodes if n != x]
        if kind == "isolate":
            self.blocked = {(x, y) for y in others} | {(y, x) for y in others}
            desc = f"isolate n{x}"
        elif kind == "oneway":
            if rng.random() < 0.5:
                self.blocked = {(x, y) for y in others}
                desc = f"n{x} cannot send"
            else:
                self.blocked = {(y, x) for y in others}
                desc = f"n{x} cannot receive"
        else:
            shuffled = nodes[:]
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(nodes) - 1)
            a, b = sorted(shuffled[:cut]), sorted(shuffled[cut:])
            self.blocked = {(i, j) for i in a for j in b} | {(j, i) for i in a for j in b}
            desc = f"split {a} | {b}"
        self.stats["partitions"] += 1
        self._trace(f"partition: {desc}")

    def _faults(self) -> None:
        p, rng = self.params, self.rng
        for nid, at in sorted(self.restart_at.items()):
            if at <= self.tick_no:
                del self.restart_at[nid]
                self._restart(nid)
        if rng.random() < p.crash_prob:
            alive = [n for n in sorted(self.hosts) if self.hosts[n].node is not None]
            if alive:
                lid = self.current_leader()
                self._crash(lid if lid and rng.random() < 0.3 else rng.choice(alive))
        if self.blocked:
            if rng.random() < p.heal_prob:
                self.blocked = set()
                self._trace("network healed")
        elif rng.random() < p.partition_prob:
            self._partition()
        if rng.random() < p.transfer_prob:
            lid = self.current_leader()
            targets = [v for v in self.conf.voters if v != lid]
            if lid and targets:
                to = rng.choice(targets)
                self.stats["transfers"] += 1
                self._trace(f"n{lid} asked to transfer leadership to n{to}")
                self.hosts[lid].raw().transfer_leader(to)
                self._poke(lid)
        if rng.random() < p.membership_prob:
            self._maybe_change_membership()

    def _start_liveness(self) -> None:
        self.phase = "liveness"
        self.blocked = set()
        self.drop_prob = 0.0
        self.dup_prob = 0.0
        self.delay_max = min(self.delay_max, self.delay_min + SUBTICKS_PER_TICK)
        self._trace("liveness phase: network healed, faults and new client requests stop")
        for nid in sorted(self.restart_at):
            self._restart(nid)
        self.restart_at.clear()
        self._progress_tick = self.tick_no

    def _degrade(self) -> None:
        """The group converged: now take a minority of its voters down for good, and ask it
        to converge again. Done only once settled (every member applied every configuration
        change), so the group is sure to keep a quorum in every configuration in use."""
        voters = list(self.conf.voters)
        down = min(self.params.liveness_down, (len(voters) - 1) // 2)
        self.degraded = True
        if not down:
            return
        self.kept_down = set(self.rng.sample(voters, down))
        self._trace(f"degraded: {sorted(self.kept_down)} go down for good; converge again")
        for nid in sorted(self.kept_down):
            self._crash(nid, restart=False)
        self.live_marker_index = 0
        self.live_markers.clear()
        self._progress_tick = self.tick_no

    def _liveness(self) -> bool:
        """Propose a marker until one commits; True once every running member applied it and
        the group has a settled leader."""
        if self.live_marker_index == 0:
            lid = self.current_leader()
            if lid and self.tick_no % max(2, self.params.election_timeout_ticks // 2) == 0:
                self.live_proposals += 1
                data = encode_command(f"live-{self.live_proposals}", "put", LIVE_KEY, "x")
                try:
                    self.hosts[lid].raw().propose(data)
                except (ProposalDropped, NotLeader):
                    return False
                self.live_markers.add(data)
                self._poke(lid)
            return False
        for nid in self.members():
            if nid in self.kept_down:
                continue
            host = self.hosts[nid]
            if host.node is None or host.applied_index < self.live_marker_index:
                return False
        # Converged also means settled: a leader that has applied its whole log (so no
        # membership change that could remove it is pending) and is not handing over.
        lid = self.current_leader()
        if not lid or lid not in self.members():
            return False
        st = self.hosts[lid].raw().status()
        return st.lead_transferee == 0 and st.applied == st.last_index

    def _check_stable(self) -> None:
        """After convergence nothing disturbs the group, so its leader must stay in office:
        a leader change now is a spurious election (for example a leader that steps down
        although a quorum answers it)."""
        if self.stats["leaders_elected"] != self._leaders_at_convergence:
            raise _LivenessFailure(
                "liveness",
                "leadership changed after convergence, with no faults and a quorum up:\n"
                + "\n".join(self._node_lines()),
            )

    def _liveness_progress(self) -> tuple[int, int]:
        applied = sum(self.hosts[n].applied_index for n in self.members() if n in self.hosts)
        return self.live_marker_index, applied

    def _liveness_failure(self, why: str) -> _SimFailure:
        lines = [
            f"{why}: "
            + (
                f"marker committed at {self.live_marker_index} but not applied everywhere "
                "(or no settled leader)"
                if self.live_marker_index
                else "no liveness marker committed"
            )
        ]
        lines.extend(self._node_lines())
        return _LivenessFailure("liveness", "\n".join(lines))

    # -- clients ---------------------------------------------------------------------------

    def _clients(self) -> None:
        p, rng = self.params, self.rng
        give_up = GIVE_UP_ELECTION_TIMEOUTS * p.election_timeout_ticks * SUBTICKS_PER_TICK
        for c in self.clients:
            while c.abandoned and c.abandoned[0].call + give_up <= self.now:
                self._forget(c.abandoned.popleft())
            op = c.op
            if op is not None:
                if op.deadline > self.now:
                    continue
                self._time_out(op)
            # Back-pressure: a client with too many unanswered requests waits for one of them
            # instead of adding load to an overloaded (or partitioned) cluster.
            if (
                self.phase == "safety"
                and len(c.abandoned) < MAX_ABANDONED_OPS
                and rng.random() < p.op_prob
            ):
                self._start_op(c)

    def _start_op(self, c: _Client) -> None:
        p, rng = self.params, self.rng
        members = self.members()
        if c.believed_leader in members and rng.random() < 0.85:
            nid = c.believed_leader
        else:
            nid = rng.choice(members)
        c.seq += 1
        op_id = f"c{c.id}-{c.seq}"
        key = f"k{rng.randrange(p.keys)}"
        r = rng.random()
        inp: tuple[Any, ...]
        if r < 0.35:
            inp = ("get", key)
        elif r < 0.65:
            inp = ("put", key, f"v{c.id}.{c.seq}")
        elif r < 0.85:
            seen = c.seen.get(key)
            expected = seen if rng.random() < 0.7 else rng.choice((None, f"v{c.id}.{c.seq - 1}"))
            inp = ("cas", key, expected, f"v{c.id}.{c.seq}")
        else:
            inp = ("delete", key)
        host = self.hosts[nid]
        if host.node is None:
            c.believed_leader = 0  # connection refused: nothing happened
            return
        deadline = self.now + p.op_timeout_ticks * SUBTICKS_PER_TICK
        try:
            if inp[0] == "get" and rng.random() < p.read_index_prob:
                ctx = op_id.encode()
                op = _Op(op_id, c.id, inp, self.now, nid, deadline, ctx, b"")
                host.node.read_index(ctx)
                self.pending_reads[ctx] = op
                self.stats["reads_read_index"] += 1
            else:
                data = encode_command(op_id, *inp)
                op = _Op(op_id, c.id, inp, self.now, nid, deadline, b"", data)
                host.node.propose(data)
                self.pending_writes[data] = op
        except NotLeader as exc:
            self.stats["ops_rejected"] += 1
            c.believed_leader = exc.leader_hint
            return
        except (ProposalDropped, ReadIndexDropped):
            self.stats["ops_rejected"] += 1
            c.believed_leader = 0
            return
        c.op = op
        self._poke(nid)

    def _complete(self, op: _Op, output: Any) -> None:
        """The node ``op`` was sent to reported its result: the outcome is known now."""
        self.stats["ops_ok"] += 1
        self.history.append(Operation(op.client, op.input, op.call, output, self.now))
        c = self.clients[op.client - 1]
        if c.op is not op:
            c.abandoned.remove(op)  # a late answer to an operation the client moved on from
            self.stats["ops_late"] += 1
            return
        c.op = None
        c.believed_leader = op.node
        kind, key = op.input[0], op.input[1]
        if kind == "get":
            c.seen[key] = output
        elif kind == "put" or (kind == "cas" and output is True):
            c.seen[key] = op.input[-1]
        elif kind == "delete":
            c.seen[key] = None

    def _time_out(self, op: _Op) -> None:
        """The client stops waiting and moves on, to another node. Its request is still out
        there: if the node it went to reports a result later, that is recorded then (a client
        whose interval got longer); if never, the outcome stays unknown."""
        c = self.clients[op.client - 1]
        c.op = None
        c.believed_leader = 0
        c.abandoned.append(op)

    def _forget(self, op: _Op) -> None:
        self.pending_writes.pop(op.data, None)
        self.pending_reads.pop(op.ctx, None)
        self._record_unknown(op)

    def _record_unknown(self, op: _Op) -> None:
        if op.input[0] == "get":
            return  # an unknown read constrains nothing
        self._unknown.append((Operation.unknown(op.client, op.input, op.call), op.data))

    def _final_history(self) -> list[Operation]:
        """The clients' history plus the operations whose outcome stayed unknown to them.

        An unknown write that no node ever applied had no effect on anything observed by the
        end of the run, so it is left out. That is sound (linearizing it after everything else
        is always possible) and it makes the check stronger: a read that saw such a write's
        value can no longer be explained by it. It also keeps the search small when a stalled
        cluster times out hundreds of operations, which otherwise makes it exponential."""
        applied = {c.data for c in self.inv.committed.values() if c.data}
        history = list(self.history)
        for op, data in self._unknown:
            if data in applied:
                self.stats["ops_unknown"] += 1
                history.append(op)
            else:
                self.stats["ops_unknown_never_applied"] += 1
        return history

    def _complete_from_results(self, nid: int) -> None:
        """After a restart or a snapshot install, results can appear without an apply."""
        host = self.hosts[nid]
        for data, op in list(self.pending_writes.items()):
            if op.node == nid and op.op_id in host.sm.results:
                del self.pending_writes[data]
                self._complete(op, host.sm.results[op.op_id])

    # -- the run ---------------------------------------------------------------------------

    def _on_tick(self) -> None:
        self.tick_no += 1
        p = self.params
        if self.tick_no == p.safety_ticks:
            self._start_liveness()
        order = [n for n in sorted(self.hosts) if self.hosts[n].node is not None]
        self.rng.shuffle(order)
        for nid in order:
            node = self.hosts[nid].raw()
            node.tick()
            if node.has_ready():
                self._poke(nid)
        if self.phase == "safety":
            self._faults()
        self._clients()
        if self.inv.max_committed_index > self._traced_commit:
            self._traced_commit = self.inv.max_committed_index
            c = self.inv.committed[self._traced_commit]
            self._trace(f"committed up to {c.index} (term {c.term})")
        if self.phase == "liveness":
            if self.converged_tick:
                self._check_stable()
                if self.tick_no >= self.converged_tick + STABLE_ELECTION_TIMEOUTS * (
                    p.election_timeout_ticks
                ):
                    self.done = True
            elif self._liveness():
                self._trace(f"converged: every member applied the marker {self.live_marker_index}")
                if not self.degraded:
                    self._degrade()
                if self.live_marker_index:  # not degraded, or nothing was taken down
                    self.converged_tick = self.tick_no
                    self._leaders_at_convergence = self.stats["leaders_elected"]
            else:
                progress = self._liveness_progress()
                if progress != self._progress:
                    self._progress, self._progress_tick = progress, self.tick_no
                elif self.tick_no >= self._progress_tick + p.liveness_ticks:
                    raise self._liveness_failure(
                        f"no progress for {p.liveness_ticks} ticks in the healed phase"
                    )
                if self.tick_no >= p.safety_ticks + LIVENESS_CAP * p.liveness_ticks:
                    raise self._liveness_failure(
                        f"no convergence within {LIVENESS_CAP * p.liveness_ticks} ticks of healing"
                    )
        self._push(self.now + SUBTICKS_PER_TICK, _TICK, None)

    def _loop(self) -> None:
        for nid in self.conf.voters:
            self._create_host(nid, bootstrap=self.conf)
        self._push(SUBTICKS_PER_TICK, _TICK, None)
        queue = self._queue
        all_nodes = self.hosts.keys
        while queue and not self.done:
            at, _, kind, payload = heapq.heappop(queue)
            self.now = at
            if kind == _DELIVER:
                dst = self._deliver(payload)
                if dst is not None:
                    self._check_nodes((dst,))
            elif kind == _READY:
                self._run_ready(payload)
                self._check_nodes((payload,))
            elif kind == _WRITTEN:
                self._run_written(payload)
                self._check_nodes((payload,))
            else:
                self._on_tick()
                self._check_nodes(list(all_nodes()))
            if self._to_retire:
                self._retire()

    def _final_checks(self) -> None:
        self._durable_quorum()
        check_log_matching({nid: st.full_log() for nid, st in self.storages.items()})
        check_applied_entries({nid: h.applied_entries for nid, h in self.hosts.items()})
        check_state_machines(
            {
                nid: (h.applied_index, h.sm.snapshot())
                for nid, h in self.hosts.items()
                if h.node is not None
            }
        )
        for c in self.clients:
            while c.abandoned:
                self._forget(c.abandoned.popleft())
            if c.op is not None:
                self._forget(c.op)
                c.op = None
        history = self._final_history()
        self.history_len = len(history)
        check_history(history, CHECKER_TIMEOUT_S)

    def _node_lines(self) -> list[str]:
        lines = [
            f"membership: voters {list(self.conf.voters)} learners {list(self.conf.learners)} "
            f"(as of index {self.conf_index}); retired {sorted(self.retired)}"
        ]
        for nid, host in sorted(self.hosts.items()):
            st = self.storages[nid]
            if host.node is None:
                state = "retired" if nid in self.retired else "down"
                lines.append(
                    f"  n{nid}: {state}; durable term {st.hard_state.term} "
                    f"commit {st.hard_state.commit} log [{st.first_index()}, {st.last_index()}]"
                )
                continue
            s = host.node.status()
            lines.append(
                f"  n{nid}: {s.role.value} term {s.term} leader {s.leader_id} commit {s.commit} "
                f"applied {host.applied_index} log [{s.first_index}, {s.last_index}] "
                f"conf {list(s.conf_state.voters)}+{list(s.conf_state.learners)}"
            )
        return lines

    def _report(self, invariant: str, detail: str) -> str:
        lines = [
            f"SIMULATION FAILED: seed {self.seed} at tick {self.now / SUBTICKS_PER_TICK:.1f} "
            f"({self.phase} phase)",
            f"invariant: {invariant}",
            detail,
            f"params: {self.params.describe()}",
            *self._node_lines(),
            f"last {len(self.trace_tail)} trace lines:",
            *(f"  {line}" for line in self.trace_tail),
            "replay: "
            + (
                f"Simulator({self.seed}, params=SimParams(<the params above>)).run()"
                if self.custom_params
                else replay_command(self.seed)
            ),
        ]
        return "\n".join(lines)

    def run(self) -> SimResult:
        if self.verbose:
            print(f"seed {self.seed}: {self.params.describe()}", file=self.out)
        failure: str | None = None
        invariant: str | None = None
        try:
            liveness: _LivenessFailure | None = None
            try:
                self._loop()
            except _LivenessFailure as exc:
                liveness = exc
            # Safety is checked in full even when the cluster did not converge.
            self._final_checks()
            if liveness is not None:
                raise liveness
        except (InvariantFailure, _SimFailure) as exc:
            invariant, failure = exc.invariant, self._report(exc.invariant, exc.detail)
        except InvariantViolation as exc:
            invariant = "core assertion (InvariantViolation)"
            failure = self._report(invariant, "".join(traceback.format_exception(exc)))
        except Exception as exc:
            invariant = f"unexpected {type(exc).__name__}"
            failure = self._report(invariant, "".join(traceback.format_exception(exc)))
        for nid, host in sorted(self.hosts.items()):
            hs = self.storages[nid].hard_state
            self._hash.update(
                f"n{nid} {hs.term} {hs.vote} {hs.commit} {host.applied_index}\n".encode()
            )
        self._hash.update(repr(self.history).encode())
        if self.verbose:
            if failure is not None:
                print(failure, file=self.out)
            else:
                print(
                    f"seed {self.seed} passed: {self.tick_no} ticks, {self.history_len} "
                    f"operations, converged at tick {self.converged_tick}; "
                    + " ".join(f"{k}={v}" for k, v in self.stats.items()),
                    file=self.out,
                )
        return SimResult(
            seed=self.seed,
            params=self.params,
            failure=failure,
            invariant=invariant,
            ticks=self.tick_no,
            fingerprint=self._hash.hexdigest(),
            stats=dict(self.stats),
            history_ops=self.history_len,
        )


def run_seed(seed: int, verbose: bool = False, out: TextIO | None = None) -> SimResult:
    """Run one seed (the function the tests and the sweep call)."""
    return Simulator(seed, verbose=verbose, out=out).run()


# -- command line -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SweepFailure:
    """One failed seed of a sweep: ``report`` is the full failure report."""

    seed: int
    invariant: str
    report: str


def _sweep_one(seed: int) -> SweepFailure | None:
    r = run_seed(seed)
    if r.failure is None or r.invariant is None:
        return None
    return SweepFailure(seed, r.invariant, r.failure)


def _parse_range(text: str) -> range:
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected LO:HI, got {text!r}")
    return range(int(lo), int(hi))


def sweep(
    seeds: Iterable[int], jobs: int, on_done: Callable[[int, SweepFailure | None], None]
) -> list[SweepFailure]:
    """Run many seeds on ``jobs`` processes (in this process when ``jobs == 1``)."""
    failures: list[SweepFailure] = []
    done = 0

    def record(f: SweepFailure | None) -> None:
        nonlocal done
        done += 1
        if f is not None:
            failures.append(f)
        on_done(done, f)

    if jobs <= 1:
        for seed in seeds:
            record(_sweep_one(seed))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for f in pool.map(_sweep_one, seeds, chunksize=4):
                record(f)
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """``--seed N [--verbose]`` replays one seed; ``--seeds LO:HI [--jobs J]`` sweeps.

    Exit status 1 when any seed fails."""
    parser = argparse.ArgumentParser(
        prog="python -m dkv.testing.sim",
        description="Deterministic Raft simulator: one seed drives everything.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--seed", type=int, help="run (replay) one seed")
    group.add_argument("--seeds", type=_parse_range, help="run seeds LO:HI (HI excluded)")
    parser.add_argument("--verbose", action="store_true", help="print parameters and trace")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    args = parser.parse_args(argv)
    if args.seed is not None:
        result = run_seed(args.seed, verbose=args.verbose)
        if not args.verbose:
            print(
                result.failure
                if result.failure is not None
                else f"seed {args.seed} passed ({result.ticks} ticks, {result.history_ops} "
                f"operations, fingerprint {result.fingerprint})"
            )
        return 0 if result.ok else 1

    seeds: range = args.seeds
    start = time.perf_counter()
    every = max(1, len(seeds) // 20)

    def on_done(done: int, f: SweepFailure | None) -> None:
        if f is not None:
            print(
                f"seed {f.seed}: FAILED ({f.invariant}); replay: {replay_command(f.seed)}",
                flush=True,
            )
        if done % every == 0 or done == len(seeds):
            elapsed = time.perf_counter() - start
            print(
                f"  {done}/{len(seeds)} seeds in {elapsed:.1f}s ({done / elapsed:.1f} seeds/s)",
                flush=True,
            )

    failures = sweep(seeds, args.jobs, on_done)
    elapsed = time.perf_counter() - start
    print(
        f"{len(seeds)} seeds in {elapsed:.1f}s ({len(seeds) / max(elapsed, 1e-9):.2f} seeds/s "
        f"with {args.jobs} jobs): {len(failures)} failed"
    )
    for f in failures:
        print(f"  seed {f.seed}: {f.invariant}; replay: {replay_command(f.seed)}")
    if args.verbose:
        for f in failures:
            print(f.report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
