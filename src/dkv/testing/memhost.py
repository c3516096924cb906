"""An in-memory host for one Raft member: the reference implementation of the host loop.

``MemoryHost`` does exactly what a real host does with a ``Ready`` (persist, send, apply,
serve reads, advance), with a :class:`MemoryStorage` as "disk" and a small KV state machine.
The simulator and the scenario tests drive many of them over a simulated network.

Crash model: ``crash()`` throws away the RawNode and the state machine (everything volatile);
the MemoryStorage survives, holding exactly what was persisted by completed Readys. A Ready
taken but not yet processed is lost with the crash. ``restart()`` rebuilds the state machine
from the last snapshot and replays the committed log, as a real node does.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dkv.errors import InvariantViolation
from dkv.raft import (
    ConfChange,
    Config,
    ConfState,
    Entry,
    EntryType,
    Logger,
    MemoryStorage,
    Message,
    RawNode,
    ReadState,
    Ready,
    Snapshot,
)

__all__ = ["KVStateMachine", "MemoryHost", "encode_command"]


def encode_command(op_id: str, op: str, key: str, *args: Any) -> bytes:
    """A KV command as stored in the log: JSON, so scenario output stays readable."""
    return json.dumps([op_id, op, key, *args], separators=(",", ":")).encode()


@dataclass
class KVStateMachine:
    """A deterministic KV map. Commands: put k v, delete k, get k, cas k expected new.

    ``results`` maps each command's op id to its output, which is how a client learns what
    its command did once the entry is applied.
    """

    data: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def apply(self, payload: bytes) -> None:
        op_id, op, key, *args = json.loads(payload)
        out: Any
        if op == "put":
            self.data[key] = args[0]
            out = True
        elif op == "delete":
            out = self.data.pop(key, None) is not None
        elif op == "get":
            out = self.data.get(key)
        elif op == "cas":
            expected, new = args
            if self.data.get(key) == expected:
                self.data[key] = new
                out = True
            else:
                out = False
        else:
            raise InvariantViolation(f"unknown command {op!r}")
        self.results[op_id] = out

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def snapshot(self) -> bytes:
        return json.dumps([self.data, self.results], sort_keys=True).encode()

    def restore(self, blob: bytes) -> None:
        if not blob:
            self.data, self.results = {}, {}
            return
        data, results = json.loads(blob)
        self.data, self.results = dict(data), dict(results)


class MemoryHost:
    """One Raft member with in-memory storage; see the module docstring."""

    def __init__(
        self,
        config: Config,
        storage: MemoryStorage,
        rng: random.Random,
        logger: Logger | None = None,
        snapshot_every_entries: int = 0,
        compact_keep_entries: int = 5,
    ) -> None:
        self.config = config
        self.id = config.id
        self.storage = storage
        self.rng = rng
        self.logger = logger
        # Take a snapshot after this many applied entries (0: never) and keep this many
        # entries behind it, so lagging followers sometimes need InstallSnapshot.
        self.snapshot_every_entries = snapshot_every_entries
        self.compact_keep_entries = compact_keep_entries
        self.node: RawNode | None = None
        self.sm = KVStateMachine()
        self.conf_state = ConfState()
        self.applied_index = 0
        # index -> (term, type, data) of every entry this host applied, across restarts; the
        # simulator's state-machine-safety check compares these between hosts.
        self.applied_entries: dict[int, tuple[int, EntryType, bytes]] = {}
        self.read_states: list[ReadState] = []
        self._in_flight: Ready | None = None  # taken by begin_ready, not yet written
        self.snapshots_taken = 0
        self.snapshots_installed = 0
        self.on_apply: Callable[[MemoryHost, Entry], None] | None = None
        self.start()

    @property
    def alive(self) -> bool:
        return self.node is not None

    def raw(self) -> RawNode:
        if self.node is None:
            raise InvariantViolation(f"host {self.id} is down")
        return self.node

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """(Re)create the RawNode from storage, as a process does at start-up."""
        snap = self.storage.snapshot()
        self.sm = KVStateMachine()
        self.sm.restore(snap.data)
        self.applied_index = snap.metadata.index
        self.conf_state = self.storage.initial_state()[1]
        cfg = dataclasses.replace(self.config, applied_index=self.applied_index)
        self.node = RawNode(cfg, self.storage, self.rng, self.logger)
        self.read_states = []

    def crash(self) -> None:
        """Lose everything volatile: the RawNode (unpersisted entries), a Ready being
        written, and the state machine."""
        self.node = None
        self._in_flight = None
        self.read_states = []

    def restart(self) -> None:
        if self.node is not None:
            raise InvariantViolation(f"host {self.id} is already running")
        self.start()

    # -- the host loop --------------------------------------------------------------------------

    def process_ready(self) -> list[Message]:
        """Handle one Ready if there is one, start to end; returns the messages to send."""
        if not self.raw().has_ready():
            return []
        early = self.begin_ready()
        return early + self.finish_ready()

    @property
    def ready_in_flight(self) -> bool:
        return self._in_flight is not None

    def begin_ready(self) -> list[Message]:
        """Take a Ready (there must be one) and return the messages that may be sent before
        it is persisted (``Ready.early_messages``, thesis §10.2.1). Until
        :meth:`finish_ready`, the Ready is being written: a crash loses it, and messages may
        still be stepped into the node."""
        rd = self.raw().ready()
        self._in_flight = rd
        return rd.early_messages()

    def finish_ready(self) -> list[Message]:
        """The Ready taken by :meth:`begin_ready` is written: persist, apply, advance; returns
        the rest of its messages."""
        node = self.raw()
        rd = self._in_flight
        if rd is None:
            raise InvariantViolation(f"host {self.id}: no Ready in flight")
        self._in_flight = None
        # 1. Persist: snapshot, entries, hard state.
        if rd.snapshot is not None:
            self.storage.apply_snapshot(rd.snapshot)
        if rd.entries:
            self.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.storage.set_hard_state(rd.hard_state)
        # 2. Messages are returned to the caller, who sends them after this point.
        # 3. Apply.
        if rd.snapshot is not None:
            self._install_snapshot(rd.snapshot)
        for e in rd.committed_entries:
            self._apply(node, e)
        # 4. Reads are served by the caller once applied_index >= read index.
        self.read_states.extend(rd.read_states)
        node.advance()
        self._maybe_snapshot()
        return rd.late_messages()

    def _install_snapshot(self, snap: Snapshot) -> None:
        self.sm.restore(snap.data)
        self.applied_index = snap.metadata.index
        self.conf_state = snap.metadata.conf_state
        self.snapshots_installed += 1

    def _apply(self, node: RawNode, e: Entry) -> None:
        if e.index != self.applied_index + 1:
            raise InvariantViolation(
                f"host {self.id}: applying {e.index} after {self.applied_index} (gap)"
            )
        self.applied_index = e.index
        self.applied_entries[e.index] = (e.term, e.type, e.data)
        if e.type is EntryType.CONF_CHANGE:
            self.conf_state = node.apply_conf_change(ConfChange.decode(e.data))
        elif e.data:
            self.sm.apply(e.data)
        if self.on_apply is not None:
            self.on_apply(self, e)

    def _maybe_snapshot(self) -> None:
        every = self.snapshot_every_entries
        if every <= 0:
            return
        snap_index = self.storage.snapshot().metadata.index
        if self.applied_index - snap_index < every:
            return
        self.storage.create_snapshot(self.applied_index, self.conf_state, self.sm.snapshot())
        self.snapshots_taken += 1
        compact_to = self.applied_index - self.compact_keep_entries
        if compact_to > self.storage.first_index():
            self.storage.compact(compact_to)

    def take_read_states(self) -> list[ReadState]:
        """Read states whose index has been applied: safe to serve now."""
        ready = [rs for rs in self.read_states if rs.index <= self.applied_index]
        self.read_states = [rs for rs in self.read_states if rs.index > self.applied_index]
        return ready
