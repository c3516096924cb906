"""The host runtime: one asyncio loop driving every Raft group of a process.

Generic over a :class:`StateMachine`, so the storage node (KV shards) and the membership
service reuse it. One loop iteration, for all groups at once:

1. collect the Ready of every group that has one;
2. stage, into ONE RocksDB batch: each group's snapshot, entries and hard state, and the
   effects of applying its committed entries (state machine writes + applied index, so that
   data and applied index always move together);
3. send the messages a Ready allows before its write (a leader's appends and heartbeats:
   thesis §10.2.1, the followers write in parallel with the leader), then write the batch
   with ONE fsync if any Ready needs it (group commit);
4. send the other messages (acknowledgements, votes), batched per destination node;
5. resolve the proposals and reads that became answerable, then ``advance()`` every group.

Snapshots (log compaction, thesis §5.1) never stop this loop: between two iterations, when
a group's state in RocksDB is exactly its applied index, the loop takes a cheap view of it
(``StateMachine.snapshot_view``); a thread makes the snapshot's data from the view while the
loop goes on applying; later passes of the loop write the data a chunk at a time, then
record the snapshot and compact the log (see ``Host._start_snapshot``).

Messages arriving from peers are stepped into their group as they come, between iterations
or while the write of step 3 is under way (etcd-io/raft allows stepping while a Ready is
outstanding); each one wakes the loop. Time advances by a ticker task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from opentelemetry import trace as otel_trace

from dkv.errors import (
    DeadlineExceeded,
    DkvError,
    InvalidArgument,
    InvariantViolation,
    NotLeader,
    ProposalDropped,
    ReadIndexDropped,
)
from dkv.host.tracing import ProposalTrace, RaftTracer
from dkv.host.transport import Transport
from dkv.raft import (
    ConfChange,
    Config,
    ConfState,
    EntryType,
    HardState,
    Message,
    RawNode,
    Ready,
    Role,
    Snapshot,
    SnapshotMetadata,
)
from dkv.storage import COLUMN_FAMILIES, Batch, Engine, RocksRaftStorage, group_prefix

if TYPE_CHECKING:
    from dkv.telemetry.raft_metrics import DiskMetrics

__all__ = ["ConfChangeHook", "Host", "HostConfig", "StateMachine"]

log = logging.getLogger("dkv.host")

_T = TypeVar("_T")


class StateMachine(Protocol):
    """What a group replicates. Rules: ``apply`` is deterministic (same entries, same state on
    every replica); its writes go into the batch given to ``begin`` and become durable with
    the group's applied index; ``end`` is called once that batch is written.

    Snapshots must not stop the host's loop (a follower that hears no heartbeat for an
    election timeout campaigns): ``snapshot_view`` is called on the loop and only captures
    the state (a RocksDB read view, hashicorp/raft's "cheap: capture a point in time"); the
    host then reads the chunks in a thread while later entries are applied, so making them
    must read nothing but that capture.

    A state machine that keeps its state in memory (the membership map) sets a class attribute
    ``durable = False``: at start the host restores it from the group's latest snapshot and
    applies the entries after it again (Raft thesis §5.1: the snapshot plus the log is the
    state). Without the attribute the state is taken to live in the batches' writes."""

    def begin(self, batch: Batch) -> None: ...

    def apply(self, index: int, data: bytes) -> Any: ...

    def end(self) -> None: ...

    def snapshot_view(self) -> Iterable[bytes]:
        """The whole state as of the last written batch, as chunks whose concatenation is
        the snapshot's data. Called between batches, on the loop: capture the state now,
        cheaply; the chunks are read later, in a thread, while batches go on."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot's data, staged into the open batch."""
        ...


# Called while a group applies a committed membership change, with the batch that makes it
# durable: (group id, the change, the configuration after it, batch). The node uses it to learn
# a new member's address from the change's context and to persist its member registry.
ConfChangeHook = Callable[[int, ConfChange, ConfState, Batch], None]


@dataclass(frozen=True)
class HostConfig:
    node_id: int
    tick_interval_ms: int = 100
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    # Log compaction (thesis §5.1): snapshot a group every this many applied entries and keep
    # this many entries behind the snapshot, so briefly lagging followers catch up from the
    # log instead of needing the whole snapshot.
    snapshot_every_entries: int = 10_000
    compact_keep_entries: int = 1_000
    # Snapshots made at once, each in its own thread (a snapshot pins a RocksDB view and
    # then holds its data in memory until it is written): a group waits for a free one.
    snapshot_jobs_max: int = 1
    # A snapshot's data is written to RocksDB this many bytes per write, one write per loop
    # pass (one write holds the GIL while RocksDB copies it: 300 MB took about 1 s here).
    snapshot_write_chunk_bytes: int = 4 << 20


@dataclass
class _Group:
    group_id: int
    node: RawNode
    storage: RocksRaftStorage
    sm: StateMachine
    # index -> (term, future): a proposal is answered when its entry applies.
    proposals: dict[int, tuple[int, asyncio.Future[Any]]] = field(default_factory=dict)
    # index -> the spans of a traced proposal (a subset of ``proposals``; see host.tracing).
    traced: dict[int, ProposalTrace] = field(default_factory=dict)
    # read context -> future waiting for its ReadState; then (index, future) until applied.
    reads: dict[bytes, asyncio.Future[int]] = field(default_factory=dict)
    # Reads that arrived since the last iteration: one ReadIndex request for all of them.
    read_batch: asyncio.Future[int] | None = None
    read_waiters: list[tuple[int, asyncio.Future[int]]] = field(default_factory=list)
    known_leader: int = 0
    # The applied index whose batch is written. ``storage.applied_index`` moves when an apply
    # is staged, before the batch reaches RocksDB; readers of RocksDB directly (the watch
    # history) must not look past this one.
    written_applied: int = 0
    # Counters exported at scrape time (dkv.telemetry.raft_metrics): plain ints, so the hot
    # path pays an addition, not a metrics call.
    leader_changes: int = 0
    entries_committed: int = 0
    entries_applied: int = 0
    proposals_failed: int = 0
    read_indexes: int = 0
    read_rounds: int = 0  # ReadIndex requests given to Raft (each confirms a batch of reads)
    # Snapshots installed from the leader: one made locally from a view taken before the
    # last install is older than the state, and is discarded.
    snapshots_installed: int = 0
    # After a local snapshot failed: no automatic one before this applied index.
    snapshot_not_before_index: int = 0


@dataclass
class _SnapshotJob:
    """A local snapshot of one group being made (see ``Host._start_snapshot``)."""

    group: _Group
    meta: SnapshotMetadata  # the applied index, its term and configuration, at the view
    installs: int  # the group's ``snapshots_installed`` when the view was taken
    abort: threading.Event  # set: the thread stops at its next chunk
    produced: asyncio.Future[bytes | None]  # the data, made in the snapshot thread
    started: float  # time.monotonic() at the view
    chunks_written: int = 0


class Host:
    """See the module docstring."""

    def __init__(
        self,
        config: HostConfig,
        engine: Engine,
        transport: Transport,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = config
        self.engine = engine
        self.transport = transport
        self.rng = rng or random.Random()
        self.groups: dict[int, _Group] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()  # notified after every loop iteration
        self._tasks: list[asyncio.Task[None]] = []
        self._read_seq = 0
        self._running = False
        # group id -> the index a snapshot_now() waits for (a snapshot at or past it).
        self._snapshot_requested: dict[int, int] = {}
        # group id -> its local snapshot under way; a job leaves once its thread is done.
        self._snapshot_jobs: dict[int, _SnapshotJob] = {}
        self._snapshot_pool: ThreadPoolExecutor | None = None
        # Groups to drop between iterations (see remove_group), with who waits for it.
        self._removals: dict[int, asyncio.Future[None]] = {}
        self.on_conf_change: ConfChangeHook | None = None
        # Counters for tests and metrics.
        self.iterations = 0
        self.ticks = 0  # ticker rounds (every group ticked once)
        self.entries_persisted = 0
        self.snapshots_taken = 0
        self.snapshots_installed = 0
        self.snapshots_sent = 0
        self.snapshots_discarded = 0  # made locally, then older than the state, or failed
        # Per group-commit histograms (fsync, batch sizes); None: not measured.
        self.disk_metrics: DiskMetrics | None = None
        # Spans of traced proposals and reads (dkv.host.tracing); None: tracing is off.
        self.tracer: RaftTracer | None = None

    # -- groups ---------------------------------------------------------------------------------

    def add_group(
        self, group_id: int, sm: StateMachine, bootstrap: ConfState | None = None
    ) -> None:
        """Host group ``group_id``. ``bootstrap`` creates it as an initial member with that
        configuration (written at index 1, as MemoryStorage does); without it the group must
        already exist on disk, or this node joins it empty and learns the configuration from
        the leader's snapshot."""
        if group_id in self.groups:
            raise InvalidArgument(f"group {group_id} already hosted")
        storage = RocksRaftStorage(self.engine, group_id)
        if bootstrap is not None and storage.last_index() == 0 and storage.snapshot().is_empty():
            b = self.engine.batch()
            storage.stage_snapshot(b, Snapshot(SnapshotMetadata(1, 1, bootstrap)))
            storage.stage_hard_state(b, HardState(term=1, commit=1))
            self.engine.write(b, sync=True)
        if not getattr(sm, "durable", True):
            storage.rewind_applied_to_snapshot()
            snap = storage.snapshot()
            if snap.data:
                b = self.engine.batch()
                sm.begin(b)
                sm.restore(snap.data)
                self.engine.write(b, sync=False)
                sm.end()
        raft_cfg = Config(
            id=self.cfg.node_id,
            election_timeout_ticks=self.cfg.election_timeout_ticks,
            heartbeat_interval_ticks=self.cfg.heartbeat_interval_ticks,
            applied_index=storage.applied_index,
            pre_vote=self.cfg.pre_vote,
            check_quorum=self.cfg.check_quorum,
            # The host answers clients itself; followers report NOT_LEADER with a hint.
            disable_proposal_forwarding=True,
        )
        node = RawNode(raft_cfg, storage, self.rng, _GroupLogger(log, group_id))
        self.groups[group_id] = _Group(
            group_id, node, storage, sm, written_applied=storage.applied_index
        )

    async def remove_group(self, group_id: int) -> None:
        """Stop hosting group ``group_id`` and delete everything of it on disk (log, state,
        data, watch history: every key prefixed with the group's id).

        Done by the loop between two iterations, so no batch staged for the group can be
        written after its keys were deleted (which would bring them back). Its pending
        proposals fail as of unknown outcome (the rest of the group may still commit them),
        its reads with ProposalDropped. Used when placement moved the replica elsewhere
        and this node was removed from the group's configuration."""
        self._group(group_id)
        fut = self._removals.get(group_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._removals[group_id] = fut
        self._wake.set()
        if not self._running:
            self._drop_removed_groups()
        await asyncio.shield(fut)

    def _drop_removed_groups(self) -> None:
        if not self._removals:
            return
        batch = self.engine.batch()
        for gid in self._removals:
            g = self.groups.pop(gid, None)
            if g is not None:
                _fail_pending(
                    g, DeadlineExceeded(f"group {gid} left this node; the write may have happened")
                )
                for cf in COLUMN_FAMILIES:
                    batch.delete_range(cf, group_prefix(gid), group_prefix(gid + 1))
            self._snapshot_requested.pop(gid, None)
            job = self._snapshot_jobs.get(gid)
            if job is not None:
                job.abort.set()  # discarded when its thread is done (the group is gone)
        self.engine.write(batch, sync=True)
        for fut in self._removals.values():
            if not fut.done():
                fut.set_result(None)
        self._removals.clear()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        self.transport.set_delivery(self._on_messages)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._ticker())]

    async def stop(self) -> None:
        self._running = False
        for job in self._snapshot_jobs.values():
            job.abort.set()
        async with self._changed:
            self._changed.notify_all()  # release watchers waiting for applies
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Snapshots under way are dropped (the log they would compact is still there). Their
        # threads read RocksDB through views: wait for them (each stops at its next chunk)
        # so that the engine may be closed once stop() returns.
        await asyncio.gather(
            *(j.produced for j in self._snapshot_jobs.values()), return_exceptions=True
        )
        self._snapshot_jobs.clear()
        if self._snapshot_pool is not None:
            self._snapshot_pool.shutdown(wait=False)  # idle: every job is done
            self._snapshot_pool = None
        self._drop_removed_groups()
        for g in self.groups.values():
            _fail_pending(g, DeadlineExceeded("host stopped; the write may have happened"))
        await self.transport.close()

    # -- client API -----------------------------------------------------------------------------

    def _group(self, group_id: int) -> _Group:
        g = self.groups.get(group_id)
        if g is None:
            raise InvalidArgument(f"group {group_id} is not hosted here")
        return g

    @property
    def running(self) -> bool:
        return self._running

    def leader(self, group_id: int) -> int:
        return self._group(group_id).node.soft_state().leader_id

    def removed_from(self, group_id: int) -> bool:
        """Whether this node applied its own removal from the group (it serves nothing of it
        any more). A node that joins has no configuration yet and is not "removed"."""
        cs = self._group(group_id).storage.conf_state
        me = self.cfg.node_id
        return bool(cs.voters) and me not in cs.voters and me not in cs.learners

    def term(self, group_id: int) -> int:
        return self._group(group_id).node.hard_state().term

    async def propose(self, group_id: int, data: bytes, timeout_s: float) -> Any:
        """Replicate ``data`` and return what the state machine's apply returned.

        Raises NotLeader (with a hint) on a follower, ProposalDropped when the write certainly
        did not happen, DeadlineExceeded when the outcome is unknown."""
        g = self._group(group_id)
        # soft/hard state, not status(): this is the hot path (status copies every progress).
        soft = g.node.soft_state()
        if soft.role is not Role.LEADER:
            raise NotLeader(soft.leader_id)
        term = g.node.hard_state().term
        index = g.node.propose(data)
        if index is None:
            raise NotLeader(g.node.soft_state().leader_id)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        g.proposals[index] = (term, fut)
        traced = None
        if self.tracer is not None:
            traced = self.tracer.start_proposal(group_id, term, index)
            if traced is not None:
                g.traced[index] = traced
        self._wake.set()
        error: BaseException | None = None
        try:
            return await _answer(fut, timeout_s)
        except TimeoutError as exc:
            g.proposals_failed += 1
            error = DeadlineExceeded(
                f"write not confirmed within {timeout_s:.3f} s; it may or may not have happened"
            )
            raise error from exc
        except BaseException as exc:
            if isinstance(exc, ProposalDropped):
                g.proposals_failed += 1
            error = exc
            raise
        finally:
            if traced is not None and self.tracer is not None:
                g.traced.pop(index, None)
                self.tracer.end_proposal(traced, error)

    async def read_index(self, group_id: int, timeout_s: float) -> int:
        """Wait until a linearizable read may be served locally (ReadIndex, thesis §6.4).

        Returns the read index; the local state machine has applied at least that far."""
        if self.tracer is not None and otel_trace.get_current_span().is_recording():
            with self.tracer.tracer.start_as_current_span(
                "raft.read_index", attributes={"dkv.shard": group_id}
            ) as span:
                index = await self._read_index(group_id, timeout_s)
                span.set_attribute("raft.read_index", index)
                return index
        return await self._read_index(group_id, timeout_s)

    async def _read_index(self, group_id: int, timeout_s: float) -> int:
        # Reads are coalesced (as etcd's server does): every read that arrives before the
        # loop's next iteration joins one ReadIndex request, so one heartbeat round confirms
        # them all. Still linearizable: the read index is taken when the loop submits the
        # request, after each of these reads arrived (thesis §6.4).
        g = self._group(group_id)
        g.read_indexes += 1
        batch = g.read_batch
        if batch is None:
            batch = asyncio.get_running_loop().create_future()
            batch.add_done_callback(_retrieve)
            g.read_batch = batch
            self._wake.set()
        try:
            # Shielded: a reader that gives up must not cancel the others' batch.
            return await asyncio.wait_for(asyncio.shield(batch), timeout_s)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"read not confirmed within {timeout_s:.3f} s") from exc

    def _submit_reads(self) -> None:
        """Turn each group's batch of waiting reads into one ReadIndex request. A leader runs
        one round at a time (as etcd's server does): reads that arrive meanwhile form the
        next batch, sent when the round ends, so under load a round costs one heartbeat
        exchange per follower for however many reads. (A leader's round ends or it steps
        down: its heartbeats carry the round until a quorum answers. A follower's round is a
        message to the leader that may be lost, so followers do not wait for it.)"""
        for g in self.groups.values():
            batch = g.read_batch
            if batch is None:
                continue
            if g.reads and g.node.soft_state().role is Role.LEADER:
                continue  # a round is under way; this batch is next
            g.read_batch = None
            if batch.done():
                continue
            self._read_seq += 1
            ctx = self._read_seq.to_bytes(8, "big")
            try:
                g.node.read_index(ctx)
            except DkvError as exc:  # NotLeader, ReadIndexDropped: the readers learn why
                batch.set_exception(exc)
                continue
            g.reads[ctx] = batch
            g.read_rounds += 1

    async def propose_conf_change(
        self, group_id: int, cc: ConfChange, timeout_s: float
    ) -> ConfState:
        """Replicate a single-server membership change (thesis §4.1) and wait until it is
        applied here; returns the configuration after it. Raises NotLeader on a follower and
        ConfChangeRejected when another change is pending or the change is invalid."""
        g = self._group(group_id)
        index = g.node.propose_conf_change(cc)
        term = g.node.status().term
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        g.proposals[index] = (term, fut)
        self._wake.set()
        try:
            result = await _answer(fut, timeout_s)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"membership change not confirmed within {timeout_s:.3f} s; "
                "it may or may not have happened"
            ) from exc
        assert isinstance(result, ConfState)
        return result

    def conf_change_pending(self, group_id: int) -> bool:
        """Whether the group's leader has a membership change not yet applied (one at a
        time, thesis §4.1)."""
        g = self._group(group_id)
        return g.node.raft.pending_conf_index > g.storage.applied_index

    async def transfer_leadership(self, group_id: int, target: int, timeout_s: float) -> None:
        """Hand leadership of a group to voter ``target`` (thesis §3.10) and wait until this
        node sees it lead. Raises NotLeader when this node does not lead the group."""
        g = self._group(group_id)
        st = g.node.status()
        if st.role is not Role.LEADER:
            raise NotLeader(st.leader_id)
        if target not in st.conf_state.voters or target == self.cfg.node_id:
            raise InvalidArgument(
                f"member {target:x} is not another voter of group {group_id}; "
                f"voters are {', '.join(f'{v:x}' for v in st.conf_state.voters)}"
            )
        g.node.transfer_leader(target)
        self._wake.set()
        await self.wait_for(lambda: g.node.status().leader_id == target, timeout_s)

    async def snapshot_now(self, group_id: int, timeout_s: float) -> int:
        """Snapshot a group at its applied index now (and compact its log); returns the
        snapshot's index."""
        g = self._group(group_id)
        target = g.storage.applied_index
        if target > g.storage.snapshot().metadata.index:
            self._snapshot_requested[group_id] = max(
                target, self._snapshot_requested.get(group_id, 0)
            )
            self._wake.set()
        await self.wait_for(lambda: g.storage.snapshot().metadata.index >= target, timeout_s)
        return g.storage.snapshot().metadata.index

    # -- the loop -------------------------------------------------------------------------------

    def _on_messages(self, frm: int, batch: Sequence[tuple[int, Message]]) -> None:
        for group_id, m in batch:
            g = self.groups.get(group_id)
            if g is None:
                continue  # a group we do not (yet, or any more) host
            try:
                g.node.step(m)
            except InvalidArgument as exc:
                log.warning("node %d: bad message from %d: %s", self.cfg.node_id, frm, exc)
        self._wake.set()

    async def _ticker(self) -> None:
        interval = self.cfg.tick_interval_ms / 1000
        while self._running:
            await asyncio.sleep(interval)
            for g in self.groups.values():
                g.node.tick()
            self.ticks += 1
            self._wake.set()

    async def _run(self) -> None:
        while self._running:
            await self._wake.wait()
            self._wake.clear()
            await self._iteration()
            if self._removals:
                self._drop_removed_groups()
                async with self._changed:
                    self._changed.notify_all()  # waiters on a removed group wake up
            if self._snapshot_requested:
                self._start_requested_snapshots()
            if self._snapshot_jobs and self._continue_snapshots():
                async with self._changed:
                    self._changed.notify_all()
                # A snapshot chunk was just written (the GIL held meanwhile): let the other
                # tasks (peers' messages, the ticker, clients) in before the next pass.
                await asyncio.sleep(0)

    async def _iteration(self) -> None:
        self._submit_reads()
        readies = [(g, g.node.ready()) for g in self.groups.values() if g.node.has_ready()]
        if not readies:
            return
        self.iterations += 1
        # Spans of traced proposals need the loop's times (dkv.host.tracing).
        traced = [(g, rd) for g, rd in readies if g.traced] if self.tracer is not None else []
        ready_ns = time.time_ns() if traced else 0
        batch = self.engine.batch()
        sync = False
        appended = 0
        appended_bytes = 0
        answers: list[tuple[_Group, int, int, Any]] = []
        for g, rd in readies:
            st = g.storage
            g.sm.begin(batch)
            if rd.snapshot is not None:
                st.stage_snapshot(batch, rd.snapshot)
                g.sm.restore(rd.snapshot.data)
                self.snapshots_installed += 1
                g.snapshots_installed += 1
                job = self._snapshot_jobs.get(g.group_id)
                if job is not None:
                    job.abort.set()  # older than what is installed: discarded when done
            st.stage_append(batch, rd.entries)
            if rd.hard_state is not None:
                st.stage_hard_state(batch, rd.hard_state)
            sync = sync or rd.must_sync
            self.entries_persisted += len(rd.entries)
            appended += len(rd.entries)
            if self.disk_metrics is not None:
                appended_bytes += sum(len(e.data) for e in rd.entries)
            g.entries_committed += len(rd.committed_entries)
            g.entries_applied += len(rd.committed_entries)
            conf = st.conf_state
            for e in rd.committed_entries:
                result: Any = None
                if e.type is EntryType.CONF_CHANGE:
                    cc = ConfChange.decode(e.data)
                    conf = g.node.apply_conf_change(cc)
                    if self.on_conf_change is not None:
                        self.on_conf_change(g.group_id, cc, conf, batch)
                    result = conf
                elif e.data:
                    result = g.sm.apply(e.index, e.data)
                answers.append((g, e.index, e.term, result))
            if rd.committed_entries:
                st.stage_applied(batch, rd.committed_entries[-1].index, conf)
        # Group commit: every group's Ready in one write, at most one fsync. The write itself
        # is a memtable insert plus an unsynced WAL append, done here on the loop; the fsync
        # (Engine.sync) runs in a thread and releases the GIL, so peers' messages and
        # clients' calls are taken in meanwhile and batched into the next iteration. (A
        # synced rocksdict write holds the GIL through its fsync and stopped the loop: 22% of
        # the leader's GIL time, measured with `make bench-node`.)
        # A leader's appends and heartbeats go out now, while its own write is under way
        # (thesis §10.2.1; Ready.early_messages): the followers' fsyncs overlap ours.
        self._send_messages(readies, early=True)
        started = time.perf_counter()
        write_ns = time.time_ns() if traced else 0
        self.engine.write(batch, sync=False)
        if sync:
            await asyncio.to_thread(self.engine.sync)
        if traced:
            self._trace_iteration(traced, ready_ns, write_ns, sync, len(readies))
        disk = self.disk_metrics
        if disk is not None:
            took = time.perf_counter() - started
            disk.backend_commit.observe(took)
            if sync:
                disk.wal_fsync.observe(took)
            if appended:
                disk.batch_entries.observe(appended)
                disk.batch_bytes.observe(appended_bytes)
        for g, _ in readies:
            g.sm.end()
            g.written_applied = g.storage.applied_index
        self._send_messages(readies, early=False)
        for g, index, term, result in answers:
            pending = g.proposals.pop(index, None)
            if pending is None or pending[1].done():
                continue
            if pending[0] == term:
                pending[1].set_result(result)
            else:
                # Another leader's entry took this index: ours was never committed.
                pending[1].set_exception(ProposalDropped("leadership changed; not applied"))
        for g, rd in readies:
            g.node.advance()
            if rd.soft_state is not None and rd.soft_state.leader_id != g.known_leader:
                if rd.soft_state.leader_id:
                    g.leader_changes += 1  # as etcd counts: a new leader known, not its loss
                g.known_leader = rd.soft_state.leader_id
                # Reads waiting for a leader's confirmation will not get it from a leader
                # that is gone: fail them now (safe to retry) instead of at their deadline.
                for rfut in g.reads.values():
                    if not rfut.done():
                        rfut.set_exception(ReadIndexDropped("leader changed; retry the read"))
                g.reads.clear()
                if g.read_batch is not None:
                    self._wake.set()  # the waiting batch goes to the new leader (or fails)
            for rs in rd.read_states:
                fut = g.reads.pop(rs.request_ctx, None)
                if g.read_batch is not None:
                    self._wake.set()  # the round ended: send the next batch
                if fut is not None and not fut.done():
                    g.read_waiters.append((rs.index, fut))
            applied = g.storage.applied_index
            still = []
            for index, fut in g.read_waiters:
                if fut.done():
                    continue
                if index <= applied:
                    fut.set_result(index)
                else:
                    still.append((index, fut))
            g.read_waiters = still
        # Every group's batch is written and ended: RocksDB holds exactly its applied state,
        # the moment a snapshot's view must be taken.
        self._start_due_snapshots([g for g, _ in readies])
        # More may be ready already (messages stepped while we were writing).
        if any(g.node.has_ready() for g in self.groups.values()):
            self._wake.set()
        async with self._changed:
            self._changed.notify_all()

    def _send_messages(self, readies: list[tuple[_Group, Ready]], *, early: bool) -> None:
        """Send the Readys' early (before the write) or late (after it) messages, batched per
        destination node."""
        outbox: dict[int, list[tuple[int, Message]]] = defaultdict(list)
        for g, rd in readies:
            for m in rd.early_messages() if early else rd.late_messages():
                outbox[m.to].append((g.group_id, m))
                if m.snapshot is not None and m.snapshot.done:
                    self.snapshots_sent += 1  # the last chunk of one InstallSnapshot
        for to, msgs in outbox.items():
            self.transport.send(to, msgs)

    def _trace_iteration(
        self,
        traced: list[tuple[_Group, Any]],
        ready_ns: int,
        write_ns: int,
        sync: bool,
        groups: int,
    ) -> None:
        """Record the spans of this iteration's traced proposals (dkv.host.tracing)."""
        assert self.tracer is not None
        done_ns = time.time_ns()
        for g, rd in traced:
            batch: dict[str, Any] | None = None
            for e in rd.entries:
                t = g.traced.get(e.index)
                if t is None:
                    continue
                if batch is None:
                    batch = {
                        "dkv.shard": g.group_id,
                        "dkv.batch.entries": sum(len(r.entries) for _, r in traced),
                        "dkv.batch.groups": groups,
                        "dkv.fsync": sync,
                    }
                self.tracer.appended(t, write_ns, done_ns, batch)
            for e in rd.committed_entries:
                t = g.traced.get(e.index)
                if t is not None:
                    self.tracer.committed(t, ready_ns, done_ns)

    # -- snapshots (thesis §5.1) ---------------------------------------------------------------

    def _start_due_snapshots(self, groups: list[_Group]) -> None:
        """Start a snapshot of each group that applied ``snapshot_every_entries`` entries
        past its last one, while a job is free. Called between batches."""
        every = self.cfg.snapshot_every_entries
        if every <= 0:
            return
        for g in groups:
            if len(self._snapshot_jobs) >= self.cfg.snapshot_jobs_max:
                return  # the others are still due at their next Ready
            st = g.storage
            if (
                g.group_id not in self._snapshot_jobs
                and st.applied_index - st.snapshot().metadata.index >= every
                and st.applied_index >= g.snapshot_not_before_index
            ):
                self._start_snapshot(g)

    def _start_requested_snapshots(self) -> None:
        """Start the snapshots ``snapshot_now`` asked for, one per group at a time; a request
        is done once the group has a snapshot at or past its index. Called between
        iterations, when no batch is open."""
        for gid, target in list(self._snapshot_requested.items()):
            g = self.groups.get(gid)
            if g is None or g.storage.snapshot().metadata.index >= target:
                del self._snapshot_requested[gid]
            elif gid not in self._snapshot_jobs and (
                len(self._snapshot_jobs) < self.cfg.snapshot_jobs_max
            ):
                # Else: after the job under way (it may fall short of the target, or be
                # discarded), or when a job is free.
                self._start_snapshot(g)

    def _start_snapshot(self, g: _Group) -> None:
        """Take group ``g``'s snapshot view now and make its data in a snapshot thread.

        Called only between batches (after an iteration's write, when every group's state
        machine ended its batch): RocksDB then holds exactly the effects of the entries up to
        the applied index, and the metadata recorded (index, its term, the configuration
        there) is taken at the same moment. Entries applied after this are not in the view.
        The loop does not wait for the thread: ``_continue_snapshots`` picks the data up."""
        st = g.storage
        index = st.applied_index
        if g.written_applied != index:
            raise InvariantViolation(
                f"group {g.group_id}: snapshot view at applied {index} with only "
                f"{g.written_applied} written"
            )
        meta = SnapshotMetadata(index=index, term=st.term(index), conf_state=st.conf_state)
        try:
            view = g.sm.snapshot_view()
        except InvariantViolation:
            raise
        except Exception:  # the log is intact: no snapshot is no loss, a dead loop is
            log.exception("group %d: no snapshot view at %d", g.group_id, index)
            self._snapshot_failed(g)
            return
        if self._snapshot_pool is None:
            self._snapshot_pool = ThreadPoolExecutor(
                max_workers=self.cfg.snapshot_jobs_max, thread_name_prefix="dkv-snapshot"
            )
        abort = threading.Event()
        produced = asyncio.get_running_loop().run_in_executor(
            self._snapshot_pool, _produce_snapshot, view, abort
        )
        produced.add_done_callback(self._snapshot_produced)
        self._snapshot_jobs[g.group_id] = _SnapshotJob(
            g, meta, g.snapshots_installed, abort, produced, time.monotonic()
        )

    def _snapshot_produced(self, fut: asyncio.Future[bytes | None]) -> None:
        _retrieve(fut)  # read in _continue_snapshots, unless the host stopped first
        self._wake.set()

    def _snapshot_failed(self, g: _Group) -> None:
        """No retry at once (every pass would fail the same way): after as many entries as
        between two snapshots; a snapshot_now() waiting for it gets DeadlineExceeded."""
        g.snapshot_not_before_index = g.storage.applied_index + self.cfg.snapshot_every_entries
        self._snapshot_requested.pop(g.group_id, None)
        self.snapshots_discarded += 1

    def _snapshot_stale(self, job: _SnapshotJob) -> str | None:
        """Why ``job``'s snapshot must not be recorded any more, or None."""
        g = job.group
        if self.groups.get(g.group_id) is not g:
            return "the group was removed"
        if g.snapshots_installed != job.installs:
            return "the leader's snapshot was installed meanwhile"
        if job.meta.index <= g.storage.snapshot().metadata.index:
            return "a newer snapshot was recorded meanwhile"
        return None

    def _continue_snapshots(self) -> bool:
        """Take one step with the snapshots whose data is made: drop those that are stale
        (or failed), else write ONE chunk of one, or record one whose chunks are all written
        (with the log compaction). Returns whether it did anything. Called between
        iterations, so the data, the record and the compaction are each ordered after
        the batches before them and before the ones after (a snapshot installed from the
        leader meanwhile is seen by ``_snapshot_stale``)."""
        did = False
        for gid, job in list(self._snapshot_jobs.items()):
            if not job.produced.done():
                continue
            g, fut = job.group, job.produced
            error = None if fut.cancelled() else fut.exception()
            data = fut.result() if error is None and not fut.cancelled() else None
            why = self._snapshot_stale(job)
            if error is not None or data is None or why is not None:
                del self._snapshot_jobs[gid]
                did = True
                if isinstance(error, InvariantViolation):
                    raise error
                if error is not None:
                    log.error(
                        "group %d: snapshot at %d failed", gid, job.meta.index, exc_info=error
                    )
                    if self.groups.get(gid) is g:
                        self._snapshot_failed(g)
                    continue
                self.snapshots_discarded += 1
                log.info(
                    "group %d: snapshot at %d discarded: %s",
                    gid,
                    job.meta.index,
                    why or "aborted",
                )
                continue
            # One write per call, then the loop runs an iteration before the next.
            step = self.cfg.snapshot_write_chunk_bytes
            chunks = (len(data) + step - 1) // step
            st = g.storage
            batch = self.engine.batch()
            if job.chunks_written < chunks:
                at = job.chunks_written * step
                st.stage_snapshot_chunk(
                    batch, job.meta.index, job.chunks_written, data[at : at + step]
                )
                job.chunks_written += 1
            else:
                index = job.meta.index
                st.stage_snapshot(batch, Snapshot(metadata=job.meta, data=data), chunks=chunks)
                compact_to = index - self.cfg.compact_keep_entries
                if compact_to >= st.first_index():
                    st.stage_compact(batch, compact_to)
                del self._snapshot_jobs[gid]
                self.snapshots_taken += 1
                log.info(
                    "group %d: snapshot at %d recorded (%d bytes in %d chunks, %.1f s)",
                    gid,
                    index,
                    len(data),
                    chunks,
                    time.monotonic() - job.started,
                )
            # No fsync: if lost, the log it would replace is still there (and a snapshot
            # record lost or not, the chunks it points at were written before it).
            self.engine.write(batch, sync=False)
            self._wake.set()  # the next chunk, or what the recorded snapshot allows
            return True
        return did

    def written_applied(self, group_id: int) -> int:
        """The applied index whose effects are in RocksDB (see ``_Group.written_applied``)."""
        return self._group(group_id).written_applied

    async def wait_applied(self, group_id: int, index: int) -> None:
        """Wait (without a deadline) until group ``group_id`` applied ``index`` and wrote
        the batch that did (or the host stops, or the group is removed)."""
        g = self._group(group_id)
        async with self._changed:
            # Also wakes when the group is removed (remove_group): nothing will apply there.
            await self._changed.wait_for(
                lambda: (
                    g.written_applied >= index
                    or not self._running
                    or self.groups.get(group_id) is not g
                )
            )

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``predicate()`` holds, re-checking after every loop iteration (an event,
        not a poll). Raises DeadlineExceeded after ``timeout_s``."""

        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        try:
            await asyncio.wait_for(_wait(), timeout_s)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"condition not reached within {timeout_s} s") from exc


class _GroupLogger:
    """The Raft core's log, each line prefixed with its group: a host runs many groups, and
    eight times "raft 3446837398779953191: leader at term 2" in a node's log does not say
    which shards it leads."""

    def __init__(self, logger: logging.Logger, group_id: int) -> None:
        self._log = logger
        self._prefix = f"group {group_id}: "

    def debug(self, msg: str, *args: object) -> None:
        if self._log.isEnabledFor(logging.DEBUG):
            self._log.debug(self._prefix + msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self._log.info(self._prefix + msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self._log.warning(self._prefix + msg, *args)


def _produce_snapshot(view: Iterable[bytes], abort: threading.Event) -> bytes | None:
    """In a snapshot thread: the snapshot's data, the chunks of ``view`` joined; None once
    ``abort`` is set (checked at every chunk)."""
    chunks = iter(view)
    parts: list[bytes] = []
    try:
        for part in chunks:
            if abort.is_set():
                return None
            parts.append(part)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # a generator's view is released now, not when it is collected
    return b"".join(parts)


async def _answer(fut: asyncio.Future[_T], timeout_s: float) -> _T:
    """Wait for the loop to answer ``fut``. A caller that gives up (timeout, or cancelled
    because its client went away) cancels ``fut``: the loop skips futures that are done, so
    it never fails one that nobody awaits any more. (With ``fut`` shielded, a proposal
    overwritten by another leader's entry later was failed with ProposalDropped, and asyncio
    logged "Future exception was never retrieved" for each.) Raises TimeoutError."""
    return await asyncio.wait_for(fut, timeout_s)  # cancels fut on timeout and cancellation


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen: its readers may all have given up."""
    if not fut.cancelled():
        fut.exception()


def _fail_pending(g: _Group, proposal_error: Exception) -> None:
    """Fail what waits on group ``g``: proposals with ``proposal_error``, reads with
    ProposalDropped (a read never changed anything)."""
    for _, fut in g.proposals.values():
        if not fut.done():
            fut.set_exception(proposal_error)
    batch = [g.read_batch] if g.read_batch is not None else []
    for rfut in [*g.reads.values(), *(f for _, f in g.read_waiters), *batch]:
        if not rfut.done():
            rfut.set_exception(ProposalDropped("host stopped or group removed"))
